"""Ray job entrypoint for one stage:  python -m jobs.eval --config FILE --output URI [--set k=v ...]

Same as `adapters eval`; submit it with  python -m jobs.submit --stage eval --config FILE --output URI
"""
from jobs import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("eval"))
