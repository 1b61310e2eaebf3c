"""Training adapters here: the data formats (data.py) and the loop (loop.py). The workflow
that adds the result to the registry is jobs/finetune.py."""
