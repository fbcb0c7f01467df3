"""lrs.studies.transformer: argument handling and the claim check (no training here)."""

import pytest

from lrs.studies import transformer as experiment


def _row(method, bytes_, trained, new):
    return dict(
        method=method,
        per_user_bytes=bytes_,
        trained_users=dict(accuracy=trained),
        new_users=dict(accuracy=new),
    )


def test_claim_check_names_who_beats_lrs_and_at_what_storage():
    setting = dict(
        rows=[
            _row("lrs", 80, 0.70, 0.60),
            _row("cheap", 32, 0.72, 0.55),  # beats LRS on trained users, cheaper
            _row("costly", 500, 0.69, 0.65),  # beats LRS on new users, costlier
            _row("global", 0, 0.50, 0.50),
        ]
    )
    claim = experiment.claim_check(setting)
    assert [b["method"] for b in claim["trained_users"]["beaten_by"]] == ["cheap"]
    assert claim["trained_users"]["holds"]  # nothing costlier beats LRS there
    assert [b["method"] for b in claim["new_users"]["beaten_by"]] == ["costly"]
    assert not claim["new_users"]["holds"]
    assert claim["new_users"]["beaten_by"][0]["margin"] == pytest.approx(0.05)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--kinds", "lrs,sparse"], "--kinds"),
        (["--methods", "lrs,bert"], "unknown method"),
        (["--samples", "5,x"], "--samples"),
        (["--steps", "0"], "--steps"),
        (["--lr-user", "-1"], "--lr-user"),
        (["--d-model", "30"], "--d-model"),
    ],
)
def test_bad_arguments_exit_2_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        experiment.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_quick_preset_and_explicit_options():
    args = experiment.build_parser().parse_args(["--quick", "--samples", "5,20"])
    experiment._resolve(args)
    assert args.samples == [5, 20]  # explicit wins
    assert args.methods == experiment.QUICK["methods"].split(",")
    assert args.users == experiment.QUICK["users"]
