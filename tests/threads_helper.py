"""Run work in several threads released together (shared by the multi-task thread tests)."""

import threading


def run_together(n_threads, body, timeout=300):
    """``[body(t) for t in range(n_threads)]``, each in its own thread, all released by one barrier (so
    their calls interleave); the first exception a thread raised is raised here."""
    barrier = threading.Barrier(n_threads)
    got, errors = [None] * n_threads, []

    def worker(t):
        try:
            barrier.wait(60)
            got[t] = body(t)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the calling thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout)
    if errors:
        raise errors[0]
    return got
