"""Model 3: one CNN trunk with an age head and a gender head, trained together on UTKFace.

    python tasks/train_multitask.py --recipe recipes/multitask.toml    # the shipped model's run
    python tasks/train_multitask.py --epochs 30 --age-loss-weight 4

The model (agegender.models.build_cnn), its defaults and its score live in the family registry
(agegender.families); the command line is the one every CNN trainer shares (agegender.trainer).
"""

from agegender.trainer import cnn_trainer

app = cnn_trainer("multitask")

if __name__ == "__main__":
    app()
