"""The claims ledger: the fixed verdict rule, every claim present whatever its outcome, and the command."""

from __future__ import annotations

import json
import math

import pytest

from taskarith.experiments.claims import FAILS, HOLDS, NOISE, UNMEASURED, claims_of, ledger, ledger_rows, verdict


def test_the_rule_on_hand_made_seeds():
    # Claimed sign on every seed and the mean, and the gap (0.1) beyond twice the larger spread.
    assert verdict([0.80, 0.81, 0.82], [0.70, 0.71, 0.72], "higher")["verdict"] == HOLDS
    assert verdict([0.80, 0.81, 0.82], [0.70, 0.71, 0.72], "lower")["verdict"] == FAILS
    # One seed against the claim: not "holds" even though the mean agrees.
    assert verdict([0.80, 0.81, 0.69], [0.70, 0.71, 0.72], "higher")["verdict"] == NOISE
    # Every seed agrees but the gap (0.02) is less than twice the spread (std 0.05 -> 0.1).
    assert verdict([0.75, 0.80, 0.85], [0.73, 0.78, 0.83], "higher")["verdict"] == NOISE
    # "At least": within noise supports a claim of matching, a clear deficit refutes it.
    assert verdict([0.75, 0.80, 0.85], [0.76, 0.81, 0.86], "at least")["verdict"] == HOLDS
    assert verdict([0.60, 0.61, 0.62], [0.70, 0.71, 0.72], "at least")["verdict"] == FAILS


def test_one_seed_is_indicative_and_missing_numbers_are_unmeasured():
    one = verdict([0.8], [0.7], "higher")
    assert one["verdict"] == HOLDS and one["indicative"] and one["seeds"] == 1
    assert verdict([None, math.nan], [0.7, 0.7], "higher")["verdict"] == UNMEASURED
    # Seeds are paired: a seed missing on one side drops out of both.
    paired = verdict([0.8, None, 0.82], [0.7, 0.9, 0.72], "higher")
    assert paired["seeds"] == 2 and paired["difference"]["per_seed"] == pytest.approx([0.1, 0.1])


def _method(finetuned: float, add_1: float, add_star: float, target: float, xi: float) -> dict:
    return {
        "finetuned": {"a": finetuned, "b": finetuned},
        "addition": {
            "alpha_1": {"mean_accuracy": add_1, "mean_normalized": add_1 / finetuned},
            "alpha_searched": {"mean_accuracy": add_star, "mean_normalized": add_star / finetuned},
        },
        "negation": {"a": {"alpha_searched": {"target": target}}, "b": {"alpha_searched": {"target": target}}},
        "xi_mean": xi,
        "taujp": [[0.0, 1.0], [2.0, 0.0]],
        "interference_drop": [[math.nan, 0.1], [0.2, math.nan]],
    }


def _result(seeds: int, methods: tuple[str, ...]) -> dict:
    base = {
        "standard": _method(0.80, 0.70, 0.75, 0.40, 0.3),
        "linear": _method(0.78, 0.74, 0.76, 0.30, 0.2),
        "posthoc": _method(0.76, 0.72, 0.76, 0.35, 0.25),
        "linear_taujp": _method(0.79, 0.78, 0.78, 0.20, 0.1),
        "linear_kfac": _method(0.79, 0.77, 0.77, 0.25, 0.15),
    }
    per_seed = {}
    for seed in range(seeds):
        shifted = json.loads(json.dumps({m: base[m] for m in methods}))
        for run in shifted.values():  # a little seed noise, the same for every method
            run["finetuned"] = {t: v + 0.001 * seed for t, v in run["finetuned"].items()}
        per_seed[str(seed)] = {
            "methods": shifted,
            "incremental": {
                "linear_taujp": {"after_each_arrival": [{"mean_accuracy": 0.8}]},
                "linear": {"after_each_arrival": [{"mean_accuracy": 0.7 + 0.001 * seed}]},
            },
        }
    return {
        "model": {"name": "m"},
        "tasks": ["a", "b"],
        "num_classes": {"a": 2, "b": 4},
        "profile": {"methods": list(methods)},
        "per_seed": per_seed,
    }


def test_every_claim_is_a_row_whatever_its_outcome():
    result = _result(3, ("standard", "linear", "posthoc", "linear_taujp", "linear_kfac"))
    rows = ledger(result)
    assert [r["key"] for r in rows] == [c.key for c in claims_of(result)]
    by_key = {r["key"]: r for r in rows}
    # Constructed so that the standard vectors are *more* accurate alone: the tangent paper's non-linear
    # advantage holds, and "tau-Jp gives better accuracy on each task" does not against standard.
    assert by_key["tangent.nonlinear_advantage.a"]["verdict"] == HOLDS
    assert by_key["tangent.nonlinear_advantage.a"]["left"]["mean"] == pytest.approx((0.80 - 0.78) / (1 - 1 / 2))
    assert by_key["tangent.nonlinear_advantage.b"]["left"]["mean"] == pytest.approx((0.80 - 0.78) / (1 - 1 / 4))
    assert by_key["taujp.negation_vs_linear"]["verdict"] == HOLDS
    assert by_key["tak.negation"]["verdict"] == FAILS  # kfac forgets less than tau-Jp here: reported, not dropped
    assert by_key["taujp.incremental"]["verdict"] == HOLDS
    assert by_key["taujp.public_checkpoints"]["verdict"] == UNMEASURED
    assert "bench --checkpoint" in by_key["taujp.public_checkpoints"]["why"]
    header, table = ledger_rows(rows)
    assert len(table) == len(rows) and all(len(line) == len(header) for line in table)


def test_a_method_not_run_leaves_its_claims_unmeasured_not_omitted():
    rows = {r["key"]: r for r in ledger(_result(1, ("standard", "linear")))}
    assert rows["taujp.one_shot"]["verdict"] == UNMEASURED and "linear_taujp" in rows["taujp.one_shot"]["why"]
    assert rows["tangent.addition"]["indicative"]


def test_claims_command_reads_results_and_writes_its_folder(cli, tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_result(3, ("standard", "linear", "linear_taujp"))))
    code, out, err = cli("claims", str(path), "--out", str(tmp_path / "ledger"))
    assert code == 0, err
    written = json.loads((tmp_path / "ledger" / "claims.json").read_text())
    assert len(written[str(path)]) == len(claims_of(json.loads(path.read_text())))
    assert "tau-Jp vectors forget better than linearized ones" in (tmp_path / "ledger" / "claims.md").read_text()
    # A file that is not a bench result: one error line naming it.
    bad = tmp_path / "other.json"
    bad.write_text('{"per_seed": []}')
    code, _, err = cli("claims", str(bad))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "other.json" in err and "taskarith bench" in err
