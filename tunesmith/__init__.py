"""tunesmith: post-training for causal language models, from one config to a measured result.

    import tunesmith
    run = tunesmith.train("examples/quickstart.yaml", output_dir="runs/mine")
    model, tokenizer = tunesmith.load(run.path)
    print(tunesmith.generate(model, tokenizer, ["Write 4 March 2021 as an ISO date."]))
"""
from tunesmith.api import evaluate, export, generate, load, make_pairs, merge, score, train, validate
from tunesmith.config import load_config

__version__ = "0.1.0"
__all__ = ["train", "validate", "load", "generate", "evaluate", "merge", "export", "score", "make_pairs",
           "load_config", "__version__"]
