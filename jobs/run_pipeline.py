"""Ray job entrypoint for the whole pipeline (download, prepare, train, eval, report):

    ray job submit --working-dir . -- python -m jobs.run_pipeline --config configs/demo.yaml --output /abs/out

Same as `adapters run`; `make submit` / `python -m jobs.submit` build that command for you.
"""
from jobs import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("run"))
