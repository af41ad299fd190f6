from defect_tune.cli import run

run()
