"""Model 3: one CNN trunk with an age head and a gender head, trained together on UTKFace.

    python tasks/train_multitask.py --recipe recipes/multitask.toml    # the shipped model's run
    python tasks/train_multitask.py --epochs 30 --age-loss-weight 4

The model (agegender.models.cnn.build_cnn), its defaults and its score live in the family registry
(agegender.models.registry); the command line is the one every CNN trainer shares (agegender.training.cnn_command).
"""

from agegender.training.cnn_command import cnn_trainer

app = cnn_trainer("multitask")

if __name__ == "__main__":
    app()
