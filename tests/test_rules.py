"""Rules that file instances by what the pixels show: the file's checks, and real scans that act."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from db_support import (
    copy_dicom,
    every_verdict_results,
    query,
    scan,
    small_archive,
    sorter,
    synthetic_results,
    tree_rules,
)
from pydicom.uid import generate_uid

from sorter.cli import main
from sorter.db.session import create_db_engine
from sorter.domain import ALL_LABELS
from sorter.rules.spec import RulesError, load_rules

pytest_plugins = ["db_fixtures"]

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "rules"

BAD = """\
[[rule]]
name = "one"
[rule.match]
lable = "CT"
verdict = "disagreee"
min_confidence = 1.5
[rule.file]
to = "/x/{PatientName}/{SOPInstanceUID}.dcm"

[[rule]]
name = "one"
[rule.file]
to = "$SORTER_TEST_UNSET_ROOT/{SOPInstanceUID}.dcm"
how = "rename"
"""


def _write(tmp_path: Path, text: str, name: str = "rules.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_problem_of_a_rules_file_is_reported_with_its_line(tmp_path, monkeypatch):
    monkeypatch.delenv("SORTER_TEST_UNSET_ROOT", raising=False)
    path = _write(tmp_path, BAD)
    with pytest.raises(RulesError) as caught:
        load_rules(path)
    lines = {p.split(":")[1]: p.split(": ", 1)[1] for p in caught.value.problems}
    assert "state the mode" in lines["1"]
    assert "unknown condition 'lable'" in lines["4"]
    assert "unknown verdict 'disagreee'" in lines["5"]
    assert "from 0 to 1" in lines["6"]
    assert "{PatientName}" in lines["8"]  # a patient identifier can never name a folder
    assert "second rule is named 'one'" in lines["11"]
    assert "SORTER_TEST_UNSET_ROOT is not set" in lines["13"]
    assert "how must be one of copy, link, move" in lines["14"]

    result = CliRunner().invoke(main, ["rules", "check", str(path)])
    assert result.exit_code == 2
    assert f"error: {path}:4: unknown condition 'lable'" in result.output
    assert "Traceback" not in result.output


def test_toml_syntax_errors_name_their_line(tmp_path):
    path = _write(tmp_path, 'mode = "all"\n[[rule]\nname = "x"\n')
    with pytest.raises(RulesError, match=r"not valid TOML: .*line 2"):
        load_rules(path)


def test_a_rule_without_an_action_and_a_relative_target_are_refused(tmp_path):
    text = (
        'mode = "first"\n[[rule]]\nname = "idle"\n'
        '[[rule]]\nname = "rel"\n[rule.file]\nto = "out/{SOPInstanceUID}"\n'
    )
    with pytest.raises(RulesError) as caught:
        load_rules(_write(tmp_path, text))
    assert any(":3: rule 'idle' does nothing" in p for p in caught.value.problems)
    assert any(":7: `to` must be an absolute path" in p for p in caught.value.problems)


def test_the_shipped_rule_files_check(monkeypatch, tmp_path):
    monkeypatch.setenv("SORTER_FILE_ROOT", str(tmp_path))
    monkeypatch.setenv("SORTER_NOTIFY_URL", "https://hooks.example.org/sorter")
    for label in ("CT", "MR", "PT", "NM", "XR", "MG", "US", "OT"):
        monkeypatch.setenv(f"SORTER_ROUTE_{label}_AE", f"{label}_ARCHIVE")
        monkeypatch.setenv(f"SORTER_ROUTE_{label}_HOST", "pacs.example.org")
        monkeypatch.setenv(f"SORTER_ROUTE_{label}_PORT", "11112")
    for path in DEPLOY.glob("*.toml"):
        result = CliRunner().invoke(main, ["rules", "check", str(path)])
        assert result.exit_code == 0, result.output
        assert ": ok" in result.output


def test_forward_destinations_are_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("SORTER_TEST_UNSET_HOST", raising=False)
    text = """mode = "all"
[[rule]]
name = "bad-forward"
[rule.forward]
ae_title = "A_TITLE_LONGER_THAN_16"
host = "$SORTER_TEST_UNSET_HOST"
port = 70000
"""
    with pytest.raises(RulesError) as caught:
        load_rules(_write(tmp_path, text))
    problems = "\n".join(caught.value.problems)
    assert ":5: ae_title must be 1 to 16 printable ASCII" in problems
    assert ":6: environment variable SORTER_TEST_UNSET_HOST is not set" in problems
    assert ":7: port must be a number from 1 to 65535" in problems


def test_tls_options_are_checked(tmp_path):
    text = f"""mode = "all"
[[rule]]
name = "tls"
[rule.forward]
ae_title = "PACS"
host = "pacs.example.org"
port = 2762
tls_ca = "{tmp_path / "missing-ca.pem"}"
tls_cert = "{tmp_path / "missing.pem"}"
"""
    with pytest.raises(RulesError) as caught:
        load_rules(_write(tmp_path, text))
    problems = "\n".join(caught.value.problems)
    assert ":8: tls_ca is set but tls is not: add tls = true" in problems
    assert "tls_cert and tls_key go together" in problems
    with pytest.raises(RulesError, match=r":10: tls_cert: no such file"):
        load_rules(_write(tmp_path, text.replace("port = 2762", "port = 2762\ntls = true")))


def test_notify_needs_a_web_address_and_a_sane_quiet_time(tmp_path):
    text = 'mode = "all"\n[[rule]]\nname = "n"\n[rule.notify]\nurl = "mailto:x@example.org"\nquiet_s = -1\n'
    with pytest.raises(RulesError) as caught:
        load_rules(_write(tmp_path, text))
    problems = "\n".join(caught.value.problems)
    assert ":5: [rule.notify] needs url, an http:// or https:// address" in problems
    assert ":6: quiet_s must be seconds from 0 to 86400" in problems


def _instances(url: str) -> list[tuple[str, str, str, str, str]]:
    return query(
        url,
        "SELECT i.sop_instance_uid, i.study_instance_uid, i.series_instance_uid, p.label, i.path "
        "FROM instances i JOIN predictions p ON p.id = i.prediction_id WHERE i.status = 'done'",
    )


def test_scan_files_a_mixed_drop_folder_by_predicted_label_once(db_url, tiny_model, tmp_path, monkeypatch):
    drop = tmp_path / "drop"
    files = small_archive(drop)
    sorted_root = tmp_path / "sorted"
    monkeypatch.setenv("SORTER_FILE_ROOT", str(sorted_root))
    rules = str(DEPLOY / "file-by-label.toml")

    scan(db_url, tiny_model, drop, tmp=tmp_path, extra=("--apply-rules", rules))

    classified = _instances(db_url)
    assert len(classified) == 7  # 3 CT, 3 MR, 1 RGB; the RT plan and the text file are not images
    filed = sorted(p for p in sorted_root.rglob("*") if p.is_file())
    assert len(filed) == 7
    for sop, study, series, label, path in classified:
        target = sorted_root / label / study / series / f"{sop}.dcm"
        assert target.read_bytes() == Path(path).read_bytes()
        assert Path(path).exists()  # copied, not moved
    assert not any("rtplan" in str(p) or "notes" in str(p) for p in filed)
    rows = query(db_url, "SELECT rule, action, status, attempts FROM rule_actions")
    assert sorted(rows) == [("file-by-label", "file", "done", 1)] * 7

    # A re-run, and the standalone command, never file twice.
    result = sorter("rules", "apply", rules, str(drop), url=db_url)
    assert "file-by-label: 0 done, 7 already done" in result.output
    assert query(db_url, "SELECT DISTINCT attempts FROM rule_actions") == [(1,)]
    assert len([p for p in sorted_root.rglob("*") if p.is_file()]) == 7
    assert files["ct0"].exists()


def test_a_later_scan_applies_rules_to_what_an_earlier_one_classified_through_a_link(
    sqlite_url, tiny_model, tmp_path
):
    """The end-of-scan pass finds the instances under PATH as the scan stored them: through a
    symbolic link, not its target (it found none before)."""
    small_archive(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    scan(sqlite_url, tiny_model, tmp_path / "link", tmp=tmp_path)  # no rules yet
    rules = tree_rules(tmp_path / "rules.toml", tmp_path / "sorted")
    scan(sqlite_url, tiny_model, tmp_path / "link", tmp=tmp_path, extra=("--apply-rules", str(rules)))
    assert len(list((tmp_path / "sorted").rglob("*.dcm"))) == 7
    # A sibling folder whose name starts the same is not "under" it.
    (tmp_path / "lin").mkdir()
    result = sorter("rules", "apply", str(rules), str(tmp_path / "lin"), url=sqlite_url)
    assert "0 classified instances checked" in result.output


def test_a_different_file_at_the_target_is_never_overwritten_and_heals(sqlite_url, tiny_model, tmp_path):
    drop = tmp_path / "drop"
    small_archive(drop)
    scan(sqlite_url, tiny_model, drop, tmp=tmp_path)
    sop, _study, _series, label, _path = sorted(_instances(sqlite_url))[0]
    root = tmp_path / "sorted"
    rules = tree_rules(tmp_path / "rules.toml", root)
    squatter = root / label / f"{sop}.dcm"
    squatter.parent.mkdir(parents=True)
    squatter.write_bytes(b"someone else's file")

    result = sorter("rules", "apply", str(rules), url=sqlite_url, expect=3)
    assert "tree: 6 done, 1 failed" in result.output
    assert squatter.read_bytes() == b"someone else's file"
    [(error, detail)] = query(sqlite_url, "SELECT error, detail FROM rule_actions WHERE status = 'failed'")
    assert error == "target_exists" and "not overwritten" in detail
    explained = sorter("rules", "explain", sop, "--rules", str(rules), url=sqlite_url)
    assert (
        "tree: matches: file (copy) to" in explained.output and "failed (target_exists)" in explained.output
    )

    squatter.unlink()  # the admin moves it away: the next run files the instance
    result = sorter("rules", "apply", str(rules), url=sqlite_url)
    assert "tree: 1 done, 6 already done" in result.output
    assert query(
        sqlite_url,
        "SELECT status, attempts FROM rule_actions WHERE instance_id = "
        "(SELECT id FROM instances WHERE sop_instance_uid = :s)",
        s=sop,
    ) == [("done", 2)]


def test_scan_says_what_its_rules_did_in_this_run(sqlite_url, tiny_model, tmp_path):
    """Rules act after each batch, then once more over PATH; the summary showed only that last
    pass, so a scan that filed 7 files said "0 done, 7 already done", and counted a failure
    twice (the batch's, and the closing pass's try again)."""
    from pydicom import dcmread

    drop = tmp_path / "drop"
    files = small_archive(drop)
    root = tmp_path / "sorted"
    rules = str(tree_rules(tmp_path / "rules.toml", root))
    squatted = dcmread(files["ct0"], stop_before_pixels=True).SOPInstanceUID
    for label in (
        label.value for label in ALL_LABELS
    ):  # whatever the untrained model says, ct0's target is taken
        (root / label).mkdir(parents=True)
        (root / label / f"{squatted}.dcm").write_bytes(b"someone else's file")
    scan_args = (
        "scan",
        "--model",
        str(tiny_model),
        "--workers",
        "1",
        "--no-progress",
        "--apply-rules",
        rules,
    )

    first = sorter(*scan_args, str(drop), url=sqlite_url)
    assert "rules: 7 classified instances checked; tree: 6 done, 1 failed" in first.output, first.output
    again = sorter(*scan_args, str(drop), url=sqlite_url)
    assert "rules: 7 classified instances checked; tree: 0 done, 6 already done, 1 failed" in again.output


def test_first_match_conditions_link_and_move(sqlite_url, tiny_model, tiny_model_b, tmp_path):
    drop = tmp_path / "drop"
    files = small_archive(drop)
    scan(sqlite_url, tiny_model, drop, tmp=tmp_path)
    out = tmp_path / "out"
    rules = _write(
        tmp_path,
        f"""mode = "first"
[[rule]]
name = "never"
[rule.match]
calling_ae = "NO_SUCH_AE"
[rule.file]
to = "{out}/never/{{SOPInstanceUID}}.dcm"

[[rule]]
name = "site-a"
[rule.match]
source = "site?"
modality = "CT"
[rule.file]
to = "{out}/links/{{source}}/{{SOPInstanceUID}}.dcm"
how = "link"

[[rule]]
name = "the-rest"
[rule.match]
max_confidence = 1.0
[rule.file]
to = "{out}/moved/{{modality}}/{{SOPInstanceUID}}.dcm"
how = "move"
""",
    )
    result = sorter("rules", "apply", str(rules), url=sqlite_url)
    assert "site-a: 3 done" in result.output and "the-rest: 4 done" in result.output
    assert "never" not in result.output
    assert not (out / "never").exists()
    links = sorted((out / "links" / "siteA").iterdir())
    assert len(links) == 3 and all(os.stat(p).st_nlink == 2 for p in links)  # hard links, no copy
    assert files["ct0"].exists()
    moved = sorted(p.name for p in (out / "moved").rglob("*.dcm"))
    assert len(moved) == 4 and not files["mr0"].exists() and not files["rgb"].exists()
    # The ledger holds one action per instance: mode "first" stopped at the first rule that matched.
    assert query(sqlite_url, "SELECT count(*), count(DISTINCT instance_id) FROM rule_actions") == [(7, 7)]
    # A moved instance's path follows its file: reclassify, export and the review page read it
    # there (with the old path kept, reclassify turned the 4 moved instances into failed/unreadable).
    paths = [Path(row.path) for row in query(sqlite_url, "SELECT path FROM instances")]
    assert sum(out / "moved" in p.parents for p in paths) == 4 and all(p.exists() for p in paths)
    assert not query(sqlite_url, "SELECT path FROM files WHERE path = :p", p=str(files["mr0"]))
    sorter("reclassify", "--model", str(tiny_model_b), "--workers", "1", "--no-progress", url=sqlite_url)
    assert query(sqlite_url, "SELECT count(*) FROM instances WHERE status = 'done'") == [(7,)]


def test_explain_says_which_condition_failed(sqlite_url, tiny_model, tmp_path):
    drop = tmp_path / "drop"
    small_archive(drop)
    scan(sqlite_url, tiny_model, drop, tmp=tmp_path)
    sop = _instances(sqlite_url)[0][0]
    rules = _write(
        tmp_path,
        f'mode = "all"\n[[rule]]\nname = "odd"\n[rule.match]\nstation = "NOWHERE"\n'
        f'[rule.file]\nto = "{tmp_path}/x/{{SOPInstanceUID}}"\n',
    )
    result = sorter("rules", "explain", sop, "--rules", str(rules), url=sqlite_url)
    assert "odd: no match: station is" in result.output and "the rule wants NOWHERE" in result.output
    missing = sorter("rules", "explain", "1.2.3.4", "--rules", str(rules), url=sqlite_url, expect=1)
    assert "no instance 1.2.3.4" in missing.output


def test_a_runs_batches_and_its_closing_pass_are_counted_once():
    """What a batch did is 'already done' to the closing pass; a forward that failed in a batch
    and is not due again in the closing pass is still reported."""
    from collections import Counter

    from sorter.rules.engine import RulesReport

    batches = RulesReport(
        done=Counter(file=5, fwd=2), failed=Counter(file=1, fwd=3), dead=Counter(fwd=1), instances=9
    )
    closing = RulesReport(
        done=Counter(file=1), already=Counter(file=7, fwd=2), failed=Counter(file=1), instances=10
    )
    joined = closing.after(batches)
    assert joined.line() == (
        "rules: 10 classified instances checked; file: 6 done, 2 already done, 1 failed; "
        "fwd: 2 done, 3 failed, 1 dead-lettered"
    )


def _joined_facts(url: str) -> dict[int, tuple[Any, ...]]:
    """Each instance's series verdict and label and study verdict, as the views give them joined
    (what the rules read before they computed the series and studies of a chunk only)."""
    rows = query(
        url,
        "SELECT lp.instance_id, ss.verdict, ss.label, st.verdict FROM latest_predictions lp "
        "LEFT JOIN series_summary ss ON ss.series_instance_uid = lp.series_instance_uid "
        "LEFT JOIN study_summary st ON st.study_instance_uid = lp.study_instance_uid",
    )
    return {int(r[0]): tuple(r[1:]) for r in rows}


def test_rule_facts_give_the_views_series_and_study_verdicts(db_url):
    """Series and study facts for a chunk are what the views say, for every study verdict: one
    study per verdict, a series without a study, and an instance without a series."""
    from sorter.db.session import open_database
    from sorter.rules.engine import facts_for

    every_verdict_results(db_url)
    expected = _joined_facts(db_url)
    assert {v[2] for v in expected.values()} >= {
        "agree",
        "disagree",
        "uncertain",
        "no_header",
        "unsupported",
        None,
    }
    engine, sessions = open_database(db_url)
    try:
        with sessions() as session:
            ids = sorted(expected)
            for chunk in (ids, *([i] for i in ids)):  # whole studies, and one instance of each
                facts = facts_for(session, chunk)
                got = {
                    i: (f["series_verdict"], f["series_label"], f["study_verdict"]) for i, f in facts.items()
                }
                assert got == {i: expected[i] for i in chunk}
    finally:
        engine.dispose()


def test_rules_apply_shows_its_progress_over_the_classified_instances(
    sqlite_url, tiny_model, tmp_path, monkeypatch
):
    """`rules apply` on a large archive takes minutes: --progress counts the instances checked
    against the classified total (a bar on a terminal by default, never in a pipe or a log)."""
    small_archive(tmp_path / "drop")
    scan(sqlite_url, tiny_model, tmp_path / "drop", tmp=tmp_path)
    rules = tree_rules(tmp_path / "rules.toml", tmp_path / "sorted")
    monkeypatch.setattr("sorter.rules.engine._CHUNK", 3)  # 7 instances: chunks of 3, 3 and 1
    shown = sorter("rules", "apply", "--progress", str(rules), url=sqlite_url)
    assert "rules: 100%" in shown.stderr and "7/7" in shown.stderr and "instance" in shown.stderr
    assert "tree: 7 done" in shown.stdout
    quiet = sorter("rules", "apply", str(rules), url=sqlite_url)  # no terminal: no bar
    assert "7/7" not in quiet.stderr and "tree: 0 done, 7 already done" in quiet.stdout


def test_a_file_named_as_path_is_that_file_not_every_name_it_starts(sqlite_url, tiny_model, tmp_path):
    """`rules apply RULES a/ct0.dcm` (and a scan of that one file) acted on `a/ct0.dcm.bak` and
    `a/ct0.dcm.1` too: a file PATH was matched as a prefix of stored paths, as a folder is."""
    files = small_archive(tmp_path / "drop")
    named = files["ct0"]
    for suffix in (".bak", ".1"):  # other instances, in a series of their own
        copy_dicom(named, named.with_name(named.name + suffix), series=generate_uid())
    scan(sqlite_url, tiny_model, tmp_path / "drop", tmp=tmp_path)
    rules = tree_rules(tmp_path / "rules.toml", tmp_path / "sorted")

    result = sorter("rules", "apply", str(rules), str(named), url=sqlite_url)
    assert "1 classified instances checked" in result.output, result.output
    assert len(list((tmp_path / "sorted").rglob("*.dcm"))) == 1

    # Work cut short on all three is resumed only for the file the scan names.
    engine = create_db_engine(sqlite_url)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE instances SET status = 'pending', prediction_id = NULL"
                                   " WHERE path LIKE '%ct0.dcm%'"))  # fmt: skip
    engine.dispose()
    again = scan(sqlite_url, tiny_model, named, tmp=tmp_path, extra=("--apply-rules", str(rules)))
    assert (again["resumed"], again["classified"]) == (1, 1), again
    left = query(sqlite_url, "SELECT path FROM instances WHERE status = 'pending' ORDER BY path")
    assert [os.path.basename(row[0]) for row in left] == ["ct0.dcm.1", "ct0.dcm.bak"]
    assert len(list((tmp_path / "sorted").rglob("*.dcm"))) == 1


RULE_SETS = {  # name: (mode, [match tables]); {edge} is a confidence some instances have exactly
    "label": ("all", ['label = ["MR", "XR"]']),  # every synthetic image looks like CT: none
    "header": ("all", ['header = ["MR", "MG"]']),
    "verdict": ("all", ['verdict = ["disagree", "no_header"]']),
    "at least": ("all", ["min_confidence = {edge}"]),
    "at most": ("all", ["max_confidence = {edge}"]),
    "combined": ("all", ['header = "CT"\nlabel = "CT"\nmin_confidence = {edge}']),
    "either": ("first", ['label = "MR"', 'verdict = "uncertain"\nmax_confidence = {edge}']),
    "patterns only": ("all", ['station = "MR*"']),
    "series only": ("all", ['series_verdict = "disagree"', 'verdict = "agree"']),
}


@pytest.mark.parametrize("name", list(RULE_SETS))
def test_the_database_narrows_what_rules_check_and_never_drops_a_match(db_url, tmp_path, name):
    """`could_match` lets the database leave out instances no rule can match (on a million,
    fetching every instance's facts took 82 s for a rule that matched 36); it must let through
    every instance that `why_not` matches, on the boundaries too."""
    from sorter.db import views
    from sorter.db.session import open_database
    from sorter.rules.engine import _materializes, could_match, facts_for, matching

    synthetic_results(db_url)
    engine, sessions = open_database(db_url)
    with sessions() as session:
        ids = [row.id for row in session.execute(sa.text("SELECT id FROM instances ORDER BY id"))]
        everything = facts_for(session, ids)
        confidences = sorted({item["confidence"] for item in everything.values()})
        edge = confidences[len(confidences) // 2]
        mode, matches = RULE_SETS[name]
        text = f'mode = "{mode}"\n' + "".join(
            f'[[rule]]\nname = "r{n}"\n[rule.match]\n{match.format(edge=repr(edge))}\n'
            f'[rule.file]\nto = "{tmp_path}/{{SOPInstanceUID}}.dcm"\n'
            for n, match in enumerate(matches)
        )
        rules = load_rules(_write(tmp_path, text))
        assert _materializes(session)  # else the rules get every instance's facts, unnarrowed
        narrowed = facts_for(session, ids, rules)
        matched = {i: [r.name for r in matching(rules, item)] for i, item in everything.items()}
        wanted = {i: hits for i, hits in matched.items() if hits}
        assert (bool(wanted) or name == "label") and len(wanted) < len(everything), (name, wanted)
        assert {i: [r.name for r in matching(rules, item)] for i, item in narrowed.items()
                if matching(rules, item)} == wanted  # fmt: skip
        if name in ("patterns only", "series only"):
            assert could_match(rules, views.latest_predictions) is None  # nothing to rule out
        else:
            assert len(narrowed) < len(everything)
    engine.dispose()
