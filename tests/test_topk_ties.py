"""examples/topk_ties.py: the tie rules it compares, against the one Checkpoints applies."""
from tests.conftest import load_example


def test_tie_rules_and_the_checkpoints_rule_is_earliest(tmp_path):
    from types import SimpleNamespace

    import torch

    from pllcli.training.checkpoints import Checkpoints
    ties = load_example("topk_ties")
    values = {1: 0.5, 2: 0.7, 3: 0.7, 4: 0.6, 5: 0.7}
    assert ties.chosen(values, 2, "earliest") == [2, 3]
    assert ties.chosen(values, 2, "latest") == [3, 5]
    assert ties.chosen(values, 4, "latest") == [2, 3, 4, 5]
    ck = Checkpoints(tmp_path / "last.pt", None, tmp_path / "topk", 2, {"kind": "classifier"})
    state = SimpleNamespace(epoch=0, topk=[], to_json=lambda: {})
    model = torch.nn.Linear(1, 1)
    for epoch, v in values.items():
        state.epoch = epoch
        ck.save_epoch(model, state, {"epoch": epoch}, False, v, True, {})
    assert sorted(r["epoch"] for r in state.topk) == ties.chosen(values, 2, "earliest")
    assert sorted(p.name for p in (tmp_path / "topk").iterdir()) == ["epoch0002.pt", "epoch0003.pt"]
