from defect_tune.cli import app

app()
