"""Compare a replay result with offline results: ``python -m loadtest.compare HTTP.json
OFFLINE.json [OFFLINE2.json ...]`` (see ``loadtest.replay.compare_main``)."""

from loadtest.replay import compare_main

if __name__ == "__main__":
    compare_main()
