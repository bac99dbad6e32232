"""Archive adaptation (``sorter adapt``) on source-disjoint folds of the corpus, with injected
header errors: does adapting find them, beside the generic model?

Run: .venv/bin/python tests/bench/bench_adapt.py --generic runs/adapt-generic5
         [--repeats 20] [--out tests/bench/results-adapt-2core.json]
     .venv/bin/python tests/bench/bench_adapt.py --scale 10000 [--work DIR]
         (the cost of the command itself: a 10 000-file mixed archive, tests/bench/archive.py, is
         written, scanned into SQLite with the bundled model, then `sorter adapt --per-label 10000
         --per-series 100` samples all of it; wall and CPU seconds of the adapt process)
     where runs/adapt-generic5 is a finished leave-sources-out run that kept its fold networks:
     .venv/bin/sorter-train loso --manifest ../shared/corpus/manifest.csv --out runs/adapt-generic5 \\
         --folds 5 --config train/recipes/pretrained.yaml
     (the bundled recipe; about 50 min on 2 cores; the benchmark itself takes a few minutes)

For each fold N of that run, fold N's network never saw fold N's sources: it is "the generic
model", and fold N's sources are "the archive". Images are the run's decoded corpus images (the
serving inputs: every 2-D image is an instance, a manifest group is a series and a study, a
manifest source is a source). Each repeat then writes wrong headers into the archive:

* sporadic errors: about 2 % of its series (at least one) get another label's Modality, drawn at
  random among the other labels;
* one systematic error: one whole source (at random among those with at least 2 series) written
  as another label, as a station that stores every SPECT as PT would.

and adapts exactly as ``sorter adapt`` does (:func:`sorter.adaptation.sample.sample`, folds by
study, :func:`sorter.adaptation.core.adapt_arrays`; defaults ``--per-label 2000 --per-series 3
--folds 5``, fewer folds where the archive has fewer studies). Series-level flags:

* generic only: the generic model's series verdict (its instances' verdicts at the run's own
  temperature and operating point, as the bundled model's are chosen, by the views' rule since
  migration 0013: a strict majority, or for a series of two images or more the station rule's
  mean arm) is ``disagree``; ``generic_vote``: the majority alone, the views' rule before;
  ``--series-towards`` adds the mean arm at other bounds;
* adapted only: confident learning flags at least half of the series' sampled instances;
* combination: adapted flags it and the generic model does not confirm the header (series
  verdict not ``agree``);
* fused: confident learning on the geometric mean of the generic and the adapted probabilities
  flags at least half of the series' sampled instances (measured, not what ``sorter adapt`` does);
* adapted verdict: ``adapted_series.adapted_verdict`` as the views compute it, from the sampled
  instances' out-of-fold verdicts at the adaptation's own operating point, by the generic rule
  (a strict majority, or the mean arm on two images or more); ``adapted_verdict_vote``: the
  majority alone; ``adapted_verdict_class``: with the SOP class as a witness;
  ``combination_verdict``: the adapted verdict ``disagree`` and the generic one not ``agree``;
* ranked (``ranked_at_clean_0.005``): three series scores (the adaptation's label-issue score,
  the generic model's doubt of the header, both together) cut where they flag at most 0.5 % of
  clean series (issue 18's budget), the cut chosen on the other folds (and in-sample, as an upper
  bound): can any threshold on them meet the targets?

Variants measured and not shipped (``tests/bench/adapt_variants.py``): ``--knn K`` mixes the
head's out-of-fold probabilities with K nearest neighbours' header labels (``--knn-weight``, 1 =
the neighbours alone), ``--fold-by source`` holds whole sources out instead of studies; every
run also ranks the archive's sources by each opinion's mean evidence (``sources_ranked``: does
the systematic source fall below the honest ones?).

Reported per fold and overall (sums over folds and repeats): precision and recall of flagged series
for the sporadic errors (a flag on the systematic source counts as right, recall counts sporadic
series only; ``recall_sporadic_multi``: of those with two images or more), the share of clean
series flagged, whether the systematic source is a station-level discrepancy (``sorter report``'s
rule, :func:`sorter.reports.contradicts`: at least 10 instances, 30 % of them refuted by the
generic model or all of them doubting the header on average; until 2026-12-05 half of them refuted)
and how many honest sources it accuses, the adapted model's cross-fitted accuracy against the TRUE
labels on the archive per label (labels with >= 10 series), and CPU seconds per 1 000 sampled
instances for embedding + adaptation (decoding is the scan's and is not counted: the run's decoded
images are reused).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sorter.adaptation.core import adapt_arrays  # noqa: E402
from sorter.adaptation.crossfit import HeadRecipe, logits_of  # noqa: E402
from sorter.adaptation.embed import head_inputs  # noqa: E402
from sorter.adaptation.sample import Candidate, assign_folds, sample  # noqa: E402
from sorter.adaptation.scoring import label_issues  # noqa: E402
from sorter.compare import compare  # noqa: E402
from sorter.domain import Label, Witnesses  # noqa: E402
from sorter.model.artefact import load_artefact  # noqa: E402
from sorter.model.classifier import top_two  # noqa: E402
from sorter.model.spec import Thresholds  # noqa: E402
from sorter.reports import (  # noqa: E402
    CONTRADICTION_MIN_INSTANCES,
    CONTRADICTION_TOWARDS,
    SERIES_MEAN_MIN_IMAGES,
    contradicts,
    evidence_labels,
)
from sorter.taxonomy import class_labels  # noqa: E402
from train.calibrate import softmax_np  # noqa: E402
from train.config import load_run_config  # noqa: E402
from train.operating_point import operating_point  # noqa: E402
from train.runs import images_for, select_rows  # noqa: E402

sys.path.insert(0, str(ROOT / "tests" / "bench"))
from adapt_variants import source_folds, source_rows, source_summary, with_knn  # noqa: E402
from bench_header_class import dicom_headers  # noqa: E402
from bench_station import floats  # noqa: E402

SPORADIC_SHARE = 0.02


def vote(verdicts: list[str]) -> str:
    """The series verdict of the views before migration 0013: a strict majority, else uncertain
    (leaving out their mean arms, which refuted a header only where an image was refuted)."""
    n = len(verdicts)
    if 2 * verdicts.count("disagree") > n:
        return "disagree"
    if 2 * verdicts.count("agree") > n:
        return "agree"
    return "uncertain"


def series_verdict(verdicts: list[str], mean_refuted: bool, min_images: int = SERIES_MEAN_MIN_IMAGES) -> str:
    """The views' series verdict since migration 0013: :func:`vote`, and ``disagree`` where a
    series of at least ``min_images`` images falls under the mean rule (``mean_refuted``,
    :func:`mean_refutes`)."""
    voted = vote(verdicts)
    return "disagree" if voted == "uncertain" and mean_refuted and len(verdicts) >= min_images else voted


def header_verdicts(
    probs: np.ndarray, header: np.ndarray, agree_at: np.ndarray, disagree_at: np.ndarray
) -> list[str]:
    """The header test (:func:`sorter.compare.compare`) for every image."""
    p = probs[np.arange(len(header)), header]
    return [
        "agree" if v >= agree_at[h] else "disagree" if v <= disagree_at[h] else "uncertain"
        for v, h in zip(p, header, strict=True)
    ]


def class_verdicts(
    probs: np.ndarray,
    header: np.ndarray,
    classes: list[frozenset[Label] | None],
    labels: list[str],
    thresholds: Thresholds,
) -> list[str]:
    """:func:`sorter.compare.compare` for every image, with its file's SOP class as the second
    witness (a sporadic or systematic error rewrites the Modality and leaves the class)."""
    names = [Label(label) for label in labels]
    out = []
    for i, h in enumerate(header):
        allowed = classes[i]
        by = allowed if allowed is not None and names[h] not in allowed else None
        out.append(
            compare(
                names[h], top_two(probs[i], names), names, thresholds, Witnesses(contradicted_by=by)
            ).value
        )
    return out


def fuse(generic: np.ndarray, adapted: np.ndarray) -> np.ndarray:
    """The normalised geometric mean of two models' probabilities (N, L), row by row.

    A product of experts: a label keeps a high fused probability only where neither model finds
    it implausible. Measured as the ``fused`` method (confident learning on it), not used by
    ``sorter adapt``: it flagged more clean series than the combination (README, Adaptation
    benchmark).
    """
    logp = 0.5 * (np.log(np.clip(generic, 1e-12, None)) + np.log(np.clip(adapted, 1e-12, None)))
    logp -= logp.max(axis=1, keepdims=True)
    p = np.exp(logp)
    return np.asarray(p / p.sum(axis=1, keepdims=True), np.float64)


def inject(
    series_of: np.ndarray, source_of: np.ndarray, truth: np.ndarray, n_labels: int, rng: np.random.Generator
) -> tuple[np.ndarray, set[str], set[str], str]:
    """Headers with errors written in: (header per image, sporadic series, systematic series, source)."""
    header = truth.copy()
    series = sorted(set(series_of.tolist()))
    sources = sorted(
        {
            s
            for s in source_of.tolist()
            if len({g for g, src in zip(series_of, source_of, strict=True) if src == s}) >= 2
        }
    )
    systematic_source = str(rng.choice(sources)) if sources else ""
    in_source = source_of == systematic_source
    systematic = set(series_of[in_source].tolist())
    if systematic_source:
        true_label = int(np.bincount(truth[in_source]).argmax())
        header[in_source] = rng.choice([k for k in range(n_labels) if k != true_label])
    free = [s for s in series if s not in systematic]
    n_sporadic = max(1, round(SPORADIC_SHARE * len(series)))
    sporadic = set(rng.choice(free, size=min(n_sporadic, len(free)), replace=False).tolist())
    # sorted: a set's order changes with each process's hash seed, and so would the labels drawn
    for s in sorted(sporadic):
        mask = series_of == s
        true_label = int(np.bincount(truth[mask]).argmax())
        header[mask] = rng.choice([k for k in range(n_labels) if k != true_label])
    return header, sporadic, systematic, systematic_source


#: The station rule before 2026-12-05: half the images refuted, nothing else.
RATE_BEFORE = 0.5


def station_reported(
    evidence: np.ndarray,
    header: np.ndarray,
    verdicts: list[str],
    mask: np.ndarray,
    agree_at: np.ndarray,
    disagree_at: np.ndarray,
    rate_only: float | None = None,
) -> bool:
    """``sorter report``'s station-level discrepancy (:func:`sorter.reports.contradicts`) for the
    images in ``mask``, under their majority header label, ``evidence`` every image's
    (:func:`image_evidence`); with ``rate_only``, the earlier rule (that share refuted, the mean
    probability not looked at)."""
    if not mask.any():
        return False
    label = int(np.bincount(header[mask]).argmax())
    chosen = mask & (header == label)
    n = int(chosen.sum())
    refuted = sum(v == "disagree" for v, m in zip(verdicts, chosen, strict=True) if m)
    confirmed = sum(v == "agree" for v, m in zip(verdicts, chosen, strict=True) if m)
    if rate_only is not None:  # the mean probability unknown: contradicts() tests the rate alone
        return contradicts(n, refuted, None, None, min_rate=rate_only)
    mean_p = float(evidence[chosen].mean())
    return contradicts(
        n, refuted, mean_p, float(disagree_at[label]), n_agree=confirmed, mean_agree_at=float(agree_at[label])
    )


def mean_refutes(
    evidence: np.ndarray,
    header: np.ndarray,
    mask: np.ndarray,
    agree_at: np.ndarray,
    disagree_at: np.ndarray,
    verdicts: list[str],
    towards: float = CONTRADICTION_TOWARDS,
) -> bool:
    """Whether the images in ``mask`` (one header label), ``verdicts`` theirs, ``evidence`` every
    image's (:func:`image_evidence`), fall under the station rule's mean arm
    (:func:`sorter.reports.contradicts` without its minimum count and its share refuted), its
    bound ``towards`` along the way from ``disagree_at`` to ``agree_at``."""
    label = int(header[mask][0])
    return contradicts(
        len(verdicts),
        0,
        float(evidence[mask].mean()),
        float(disagree_at[label]),
        min_instances=1,
        min_rate=float("inf"),
        n_agree=verdicts.count("agree"),
        mean_agree_at=float(agree_at[label]),
        towards=towards,
    )


def adapted_series_verdicts(
    result: Any,
    header: np.ndarray,
    chosen: list[Candidate],
    labels: list[str],
    classes: list[frozenset[Label] | None] | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """The adapted series verdicts of the sampled series (``chosen``, ``header`` theirs): the
    out-of-fold probabilities' verdicts at the adaptation's operating point (with each file's SOP
    class as a witness where ``classes`` is given), per series with the views' rule
    (:func:`series_verdict`, the mean arm at the adapted thresholds) and by :func:`vote` alone."""
    point = result.thresholds
    agree_at = np.asarray([point.agree_at[label] for label in labels])
    disagree_at = np.asarray([point.disagree_at[label] for label in labels])
    probs = result.oof_probs
    evidence = image_evidence(probs, header, labels)
    if classes is None:
        verdicts = header_verdicts(probs, header, agree_at, disagree_at)
    else:
        verdicts = class_verdicts(probs, header, classes, labels, point)
    series = np.asarray([c.series for c in chosen])
    by_series: dict[str, list[str]] = defaultdict(list)
    for s, v in zip(series, verdicts, strict=True):
        by_series[str(s)].append(v)
    ruled = {
        s: series_verdict(v, mean_refutes(evidence, header, series == s, agree_at, disagree_at, v))
        for s, v in by_series.items()
    }
    return ruled, {s: vote(v) for s, v in by_series.items()}


#: The share of clean series a ranked score may flag (issue 18's target).
CLEAN_BUDGET = 0.005
#: Scores of a sampled series, each higher where its header is more doubted (see series_scores).
SCORES = (
    "adapted_score",
    "generic_score",
    "joint_score",
    "generic_class_score",
    "joint_class_score",
    "product_score",
    "product_class_score",
)


def image_evidence(probs: np.ndarray, header: np.ndarray, labels: list[str]) -> np.ndarray:
    """Each image's evidence for its header label (PT + NM under PT or NM), as
    ``adapted_instances.generic_p_evidence`` stores it."""
    names = [Label(label) for label in labels]
    out = np.zeros(len(header), dtype=probs.dtype)  # each mean in the probabilities' own precision
    for h in np.unique(header):
        columns = [labels.index(e.value) for e in evidence_labels(names[int(h)])]
        rows = header == h
        out[rows] = probs[rows][:, columns].sum(axis=1)
    return out


def joint(generic_evidence: float, adapted_evidence: float) -> float:
    """``adapted_series.joint_score`` (migration 0015): one minus the mean of the two models'
    mean evidence for the header. An average, not a product: one model sure of a wrong answer
    (a generic model that misreads a whole clean source) cannot outvote the other (see the README,
    Adaptation benchmark: the product ranked worse than the adaptation alone at seed 1)."""
    return 1.0 - (generic_evidence + adapted_evidence) / 2


def product(generic_evidence: float, adapted_evidence: float) -> float:
    """One minus the product of the two models' mean evidence (measured, not shipped)."""
    return 1.0 - generic_evidence * adapted_evidence


def series_scores(
    evidence: np.ndarray,
    header: np.ndarray,
    masks: dict[str, np.ndarray],
    result: Any,
    chosen: list[Candidate],
    kinds: tuple[set[str], set[str]],
    verdicts: list[str],
    with_class: list[str],
    adapted_all: np.ndarray,
) -> list[dict[str, Any]]:
    """One row per series: its kind (sporadic or systematic, as ``kinds`` holds them, else clean),
    whether it has two images or more, whether the adaptation sampled it, and its scores, each
    higher the more its header is doubted: ``adapted_score``, the mean label-issue score of its
    sampled instances (``adapted_series.label_issue_score``), or for a series not sampled one
    minus the adapted model's mean probability of the header (``adapted_all``: every image's, as
    ``sorter adapt --reclassify`` stores it); ``generic_score``, one minus the generic model's mean
    ``evidence`` for the header (:func:`image_evidence`) over all its images, an image its verdict
    refutes counting 0;
    ``joint_score``, :func:`joint` of the two (``adapted_series.joint_score``); ``generic_class_score``
    and ``joint_class_score``, the same with the verdicts that read the SOP class too (as a scan
    of DICOM stores them); ``product_score`` and ``product_class_score``, :func:`product` instead."""
    sporadic, systematic = kinds
    adapted: dict[str, list[float]] = defaultdict(list)
    for n, c in enumerate(chosen):
        adapted[c.series].append(float(result.issues.score[n]))
    pixels = np.where(np.asarray(verdicts) == "disagree", 0.0, evidence)
    classed = np.where(np.asarray(with_class) == "disagree", 0.0, evidence)
    own = adapted_all[np.arange(len(header)), header]
    out = []
    for s, mask in masks.items():
        sampled = s in adapted
        adapted_p = 1.0 - float(np.mean(adapted[s])) if sampled else float(own[mask].mean())
        generic_p, class_p = float(pixels[mask].mean()), float(classed[mask].mean())
        out.append(
            {
                "kind": "sporadic" if s in sporadic else "systematic" if s in systematic else "clean",
                "multi": bool(mask.sum() >= 2),
                "sampled": sampled,
                "evidence": {"generic": generic_p, "generic_class": class_p, "adapted": adapted_p},
                "adapted_score": 1.0 - adapted_p,
                "generic_score": 1.0 - generic_p,
                "joint_score": joint(generic_p, adapted_p),
                "generic_class_score": 1.0 - class_p,
                "joint_class_score": joint(class_p, adapted_p),
                "product_score": product(generic_p, adapted_p),
                "product_class_score": product(class_p, adapted_p),
            }
        )
    return out


def budget_ranked(per_fold: list[dict[str, Any]], budget: float = CLEAN_BUDGET) -> dict[str, Any]:
    """Each of :data:`SCORES` as a ranking cut where it flags at most ``budget`` of the clean
    series: the cut chosen on the other folds' series (cross-fitted over the benchmark's folds,
    as a constant shipped with the code would be) and, for reference, on all folds together
    (in-sample, an upper bound). Precision counts flags on the systematic source as right."""

    def cut(rows: list[dict[str, Any]], name: str) -> float:
        clean = sorted((r[name] for r in rows if r["kind"] == "clean"), reverse=True)
        allowed = int(budget * len(clean))
        return clean[allowed] if allowed < len(clean) else float("-inf")

    def scored(rows: list[dict[str, Any]], name: str, at: float) -> dict[str, float]:
        flagged = [r for r in rows if r[name] > at]
        sporadic = [r for r in rows if r["kind"] == "sporadic"]
        multi = [r for r in sporadic if r["multi"]]
        clean = [r for r in rows if r["kind"] == "clean"]
        return {
            "flagged": len(flagged),
            "right": sum(r["kind"] != "clean" for r in flagged),
            "tp": sum(r["kind"] == "sporadic" for r in flagged),
            "tp_multi": sum(r["kind"] == "sporadic" and r["multi"] for r in flagged),
            "false_clean": sum(r["kind"] == "clean" for r in flagged),
            "sporadic": len(sporadic),
            "sporadic_multi": len(multi),
            "clean": len(clean),
        }

    def rates(sums: dict[str, float]) -> dict[str, float]:
        return {
            "precision": sums["right"] / sums["flagged"] if sums["flagged"] else float("nan"),
            "recall_sporadic": sums["tp"] / sums["sporadic"] if sums["sporadic"] else float("nan"),
            "recall_sporadic_multi": sums["tp_multi"] / sums["sporadic_multi"]
            if sums["sporadic_multi"]
            else float("nan"),
            "clean_flagged_share": sums["false_clean"] / sums["clean"] if sums["clean"] else float("nan"),
        }

    everything = [r for f in per_fold for r in f["series_scores"]]
    out: dict[str, Any] = {
        "series": {
            part: dict(Counter(r["kind"] for r in everything if r["sampled"] == (part == "sampled")))
            for part in ("sampled", "not_sampled")
        }
    }
    for name in SCORES:
        held: dict[str, float] = defaultdict(float)
        cuts = []
        for f in per_fold:
            others = [r for g in per_fold if g is not f for r in g["series_scores"]]
            at = cut(others, name)
            cuts.append(at)
            for k, v in scored(f["series_scores"], name, at).items():
                held[k] += v
        at_all = cut(everything, name)
        # The ranking as a whole, sporadic against clean series (the systematic source left out:
        # its series are many and easy): average precision, and pooled over the folds.
        ranked = [r for r in everything if r["kind"] != "systematic"]
        out[name] = {
            "cross_fitted": {**rates(held), "cuts": cuts},
            "in_sample": {**rates(scored(everything, name, at_all)), "cut": at_all},
            "average_precision_sporadic": average_precision(ranked, name),
            # with --per-label below the archive's size: the series the adaptation sampled, and
            # those only the adapted model judged (as after `sorter adapt --reclassify`)
            "average_precision_sporadic_sampled": average_precision(
                [r for r in ranked if r["sampled"]], name
            ),
            "average_precision_sporadic_not_sampled": average_precision(
                [r for r in ranked if not r["sampled"]], name
            ),
        }
    return out


def average_precision(rows: list[dict[str, Any]], name: str) -> float:
    """Average precision of score ``name`` for sporadic wrong series among ``rows`` (nan unless
    both sporadic and clean ones are there)."""
    from sklearn.metrics import average_precision_score

    truth = [r["kind"] == "sporadic" for r in rows]
    if all(truth) or not any(truth):
        return float("nan")
    return float(average_precision_score(truth, [r[name] for r in rows]))


def fold_result(
    args: argparse.Namespace,
    run: Path,
    images: Any,
    fold: int,
    fold_of: dict[str, int],
    point: dict[str, Any],
    labels: list[str],
    repeats: int,
    classes_of_row: dict[int, frozenset[Label] | None],
) -> dict[str, Any]:
    """Every repeat on fold ``fold``; sums and per-repeat rows."""
    held = np.asarray([fold_of[str(s)] == fold for s in images.sources])
    archive = images.subset(held)
    loaded = load_artefact(run / f"fold-{fold}" / "model.pt")
    network = loaded.network.eval()
    index = {label: i for i, label in enumerate(labels)}
    truth = np.asarray([index[str(v)] for v in archive.labels])
    series_of = np.asarray([f"{s}/{g}" for s, g in zip(archive.sources, archive.groups, strict=True)])
    source_of = np.asarray([str(s) for s in archive.sources])
    started = time.process_time()
    embeddings = np.concatenate(
        [
            head_inputs(network, archive.eval[i : i + 128], archive.features[i : i + 128])
            for i in range(0, len(archive), 128)
        ]
    )
    embed_cpu = time.process_time() - started
    logits = embeddings @ network.head.weight.detach().numpy().T + network.head.bias.detach().numpy()
    generic = softmax_np(logits, point["temperature"])
    agree_at = np.asarray([point["agree_at"][label] for label in labels])
    disagree_at = np.asarray([point["disagree_at"][label] for label in labels])
    thresholds = Thresholds(agree_at=point["agree_at"], disagree_at=point["disagree_at"])
    classes = [classes_of_row.get(int(r)) for r in archive.rows]
    rng = np.random.default_rng(args.seed + fold)
    sums: dict[str, float] = defaultdict(float)
    rows = []
    accuracy: dict[str, list[float]] = defaultdict(list)
    scores: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []
    for repeat in range(repeats):
        header, sporadic, systematic, systematic_source = inject(
            series_of, source_of, truth, len(labels), rng
        )
        verdicts = header_verdicts(generic, header, agree_at, disagree_at)
        with_class = class_verdicts(generic, header, classes, labels, thresholds)
        evidence = image_evidence(generic, header, labels)  # what every mean rule below averages
        if repeat == 0:  # the vectorised header test is compare()'s, where no class speaks
            assert class_verdicts(generic, header, [None] * len(header), labels, thresholds) == verdicts
        candidates = [
            Candidate(i, labels[header[i]], source_of[i], series_of[i], series_of[i])
            for i in range(len(archive))
        ]
        chosen = sample(candidates, args.per_label, args.per_series, seed=repeat)
        if args.fold_by == "source":  # measured, not what sorter adapt does (adapt_variants)
            study_fold = source_folds(chosen, args.folds, seed=repeat)
        else:
            study_fold = assign_folds(chosen, min(args.folds, len({c.study for c in chosen})), seed=repeat)
        k = len(set(study_fold.values()))
        ids = np.asarray([c.instance_id for c in chosen])
        fold_ids = np.asarray([study_fold[c.study] for c in chosen])
        started = time.process_time()
        result = adapt_arrays(
            embeddings[ids],
            header[ids],
            fold_ids,
            network,
            labels,
            HeadRecipe(steps=args.steps, lr=args.lr, anchor=args.anchor),
        )
        if args.knn:  # measured, not what sorter adapt does (adapt_variants)
            result = with_knn(
                result, embeddings[ids], header[ids], fold_ids, labels, args.knn, args.knn_weight
            )
        adapt_cpu = time.process_time() - started
        sources.extend(
            source_rows(
                image_evidence(result.oof_probs, header[ids], labels),
                chosen,
                evidence,
                source_of,
                systematic_source,
                sporadic,
                CONTRADICTION_MIN_INSTANCES,
            )
        )
        flagged_instances: dict[str, list[bool]] = defaultdict(list)
        for n, c in enumerate(chosen):
            flagged_instances[c.series].append(bool(result.issues.is_issue[n]))
        by_series_verdicts: dict[str, list[str]] = defaultdict(list)
        by_series_class: dict[str, list[str]] = defaultdict(list)
        for i, v in enumerate(verdicts):
            by_series_verdicts[series_of[i]].append(v)
            by_series_class[series_of[i]].append(with_class[i])
        # The station rule's mean arm at series level: a series most of whose images are not
        # confirmed and whose mean evidence for its header label (PT + NM under PT and NM) is
        # under mean_bound; the views apply it to series of two images or more (migration 0013).
        masks = {s: series_of == s for s in by_series_verdicts}
        mean_refuted = {
            s: mean_refutes(evidence, header, masks[s], agree_at, disagree_at, v)
            for s, v in by_series_verdicts.items()
        }
        generic_series = {s: series_verdict(v, mean_refuted[s]) for s, v in by_series_verdicts.items()}
        class_series = {s: series_verdict(v, mean_refuted[s]) for s, v in by_series_class.items()}
        voted = {s: vote(v) for s, v in by_series_verdicts.items()}
        class_voted = {s: vote(v) for s, v in by_series_class.items()}
        # --series-towards: the same arm at other bounds, on every series or only on series of
        # at least two images (a single image keeps its own verdict).
        grid: dict[str, set[str]] = {}
        for t in args.series_towards:
            refuted_at = {
                s: mean_refutes(evidence, header, masks[s], agree_at, disagree_at, v, towards=t)
                for s, v in by_series_verdicts.items()
            }
            for min_images in (1, 2):
                for name, lists in (("generic", by_series_verdicts), ("generic_class", by_series_class)):
                    grid[f"{name}_series_mean@{t}/n>={min_images}"] = {
                        s
                        for s, v in lists.items()
                        if series_verdict(v, refuted_at[s], min_images) == "disagree"
                    }
        adapted_flag = {s: 2 * sum(f) >= len(f) for s, f in flagged_instances.items()}
        # The adapted verdict as the views show it (adapted_series.adapted_verdict): the
        # out-of-fold probabilities of the sampled instances at the adaptation's own operating
        # point, per series by vote, and by vote or 0013's mean arm (measured, not adopted).
        adapted_series, adapted_voted = adapted_series_verdicts(result, header[ids], chosen, labels)
        adapted_class, _ = adapted_series_verdicts(
            result, header[ids], chosen, labels, [classes[i] for i in ids]
        )
        # Confident learning on both opinions at once: the geometric mean of the generic and the
        # adapted probabilities, so that a header either model finds implausible scores low.
        fused = label_issues(header[ids], fuse(generic[ids], result.oof_probs))
        fused_instances: dict[str, list[bool]] = defaultdict(list)
        for n, c in enumerate(chosen):
            fused_instances[c.series].append(bool(fused.is_issue[n]))
        fused_flag = {s: 2 * sum(f) >= len(f) for s, f in fused_instances.items()}
        # Both models' series labels (argmax of the mean probabilities): a flag both explain the same way.
        oof_sum: dict[str, np.ndarray] = {}
        for n, c in enumerate(chosen):
            oof_sum[c.series] = oof_sum.get(c.series, 0) + result.oof_probs[n]
        generic_label = {s: int(generic[series_of == s].mean(axis=0).argmax()) for s in oof_sum}
        series_header = {s: int(header[series_of == s][0]) for s in oof_sum}
        methods = {
            "generic": {s for s, v in generic_series.items() if v == "disagree"},
            "adapted": {s for s, f in adapted_flag.items() if f},
            "combination": {s for s, f in adapted_flag.items() if f and generic_series[s] != "agree"},
            "fused": {s for s, f in fused_flag.items() if f},
            # The same two, with the SOP class as a second witness (sorter scan's verdicts since
            # 2026-12-06): only DICOM images have one.
            "generic_class": {s for s, v in class_series.items() if v == "disagree"},
            # The views' series verdict before migration 0013: the vote alone.
            "generic_vote": {s for s, v in voted.items() if v == "disagree"},
            "generic_class_vote": {s for s, v in class_voted.items() if v == "disagree"},
            "combination_class": {s for s, f in adapted_flag.items() if f and class_series[s] != "agree"},
            "adapted_verdict_vote": {s for s, v in adapted_voted.items() if v == "disagree"},
            "adapted_verdict": {s for s, v in adapted_series.items() if v == "disagree"},
            "adapted_verdict_class": {s for s, v in adapted_class.items() if v == "disagree"},
            "combination_verdict": {
                s for s, v in adapted_series.items() if v == "disagree" and generic_series[s] != "agree"
            },
            "agreement": {
                s
                for s, f in adapted_flag.items()
                if f and generic_label[s] == int(oof_sum[s].argmax()) != series_header[s]
            },
            **grid,
        }
        clean = set(by_series_verdicts) - sporadic - systematic
        sporadic_multi = {s for s in sporadic if len(by_series_verdicts[s]) >= 2}
        scores.extend(
            series_scores(
                evidence,
                header,
                masks,
                result,
                chosen,
                (sporadic, systematic),
                verdicts,
                with_class,
                softmax_np(logits_of(embeddings, result.weight, result.bias), result.temperature),
            )
        )
        row: dict[str, Any] = {
            "repeat": repeat,
            "series": len(by_series_verdicts),
            "sporadic": len(sporadic),
            "systematic_source": systematic_source,
            "systematic_series": len(systematic),
            "sampled": len(chosen),
            "folds": k,
        }
        for name, flagged in methods.items():
            tp, fp_clean = len(flagged & sporadic), len(flagged & clean)
            right = len(flagged & (sporadic | systematic))
            sums[f"{name}_flagged"] += len(flagged)
            sums[f"{name}_right"] += right
            sums[f"{name}_tp"] += tp
            sums[f"{name}_tp_multi"] += len(flagged & sporadic_multi)
            sums[f"{name}_false_clean"] += fp_clean
            row[name] = {"flagged": len(flagged), "sporadic_found": tp, "clean_flagged": fp_clean}
        sums["sporadic"] += len(sporadic)
        sums["sporadic_multi"] += len(sporadic_multi)
        sums["clean"] += len(clean)
        in_source = source_of == systematic_source
        refuted = (
            np.mean([v == "disagree" for v, m in zip(verdicts, in_source, strict=True) if m])
            if in_source.any()
            else 0.0
        )
        station = station_reported(evidence, header, verdicts, in_source, agree_at, disagree_at)
        row["systematic_refuted_share"] = float(refuted)
        row["systematic_is_station_discrepancy"] = station
        sums["systematic_reported"] += station
        sums["systematic_reported_before"] += station_reported(
            evidence, header, verdicts, in_source, agree_at, disagree_at, RATE_BEFORE
        )
        sums["systematic_reported_class"] += station_reported(
            evidence, header, with_class, in_source, agree_at, disagree_at
        )
        sums["systematic_eligible"] += bool(in_source.sum() >= CONTRADICTION_MIN_INSTANCES)
        # The honest sources of the archive (no header of theirs touched): accused? A source
        # holding a sporadic series is left out: when that series is most of it, reporting it is right.
        row["honest_sources_reported"] = []
        touched = {str(src) for src, ser in zip(source_of, series_of, strict=True) if ser in sporadic}
        for other in sorted(set(source_of.tolist()) - {systematic_source} - touched):
            mask = source_of == other
            if mask.sum() >= CONTRADICTION_MIN_INSTANCES:
                sums["honest_sources"] += 1
                accused = station_reported(evidence, header, verdicts, mask, agree_at, disagree_at)
                sums["honest_sources_reported"] += accused
                sums["honest_sources_reported_before"] += station_reported(
                    evidence, header, verdicts, mask, agree_at, disagree_at, RATE_BEFORE
                )
                sums["honest_sources_reported_class"] += station_reported(
                    evidence, header, with_class, mask, agree_at, disagree_at
                )
                if accused:
                    row["honest_sources_reported"].append(other)
        pred = result.oof_probs.argmax(axis=1)
        generic_pred = generic[ids].argmax(axis=1)
        for label_i, label in enumerate(labels):
            mask = truth[ids] == label_i
            if len({series_of[i] for i in ids[mask]}) >= 10:
                accuracy[label].append(float(np.mean(pred[mask] == label_i)))
                accuracy[f"{label} (generic)"].append(float(np.mean(generic_pred[mask] == label_i)))
        row["adapted_accuracy_true"] = float(np.mean(pred == truth[ids]))
        sums["cpu_s"] += adapt_cpu + embed_cpu * len(chosen) / len(archive)
        sums["sampled"] += len(chosen)
        rows.append(row)
    return {
        "fold": fold,
        "images": len(archive),
        "series": len(set(series_of.tolist())),
        "sources": sorted(set(source_of.tolist())),
        "sums": dict(sums),
        "accuracy_by_label": {k: float(np.mean(v)) for k, v in accuracy.items()},
        "repeats": rows,
        "series_scores": scores,
        "source_rows": sources,
    }


METHODS = (
    "generic",
    "adapted",
    "combination",
    "fused",
    "agreement",
    "generic_class",
    "combination_class",
    "generic_vote",
    "generic_class_vote",
    "adapted_verdict_vote",
    "adapted_verdict",
    "adapted_verdict_class",
    "combination_verdict",
)


def methods_in(sums: dict[str, float]) -> list[str]:
    """:data:`METHODS`, then the ``--series-towards`` grid's, in the order measured."""
    grid = [k.removesuffix("_flagged") for k in sums if k.endswith("_flagged") and "@" in k]
    return [*METHODS, *grid]


def summarise(sums: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in methods_in(sums):
        flagged = sums.get(f"{name}_flagged", 0)
        out[name] = {
            "precision": sums.get(f"{name}_right", 0) / flagged if flagged else float("nan"),
            "recall_sporadic": sums.get(f"{name}_tp", 0) / sums["sporadic"]
            if sums.get("sporadic")
            else float("nan"),
            "recall_sporadic_multi": sums.get(f"{name}_tp_multi", 0) / sums["sporadic_multi"]
            if sums.get("sporadic_multi")
            else float("nan"),
            "clean_flagged_share": sums.get(f"{name}_false_clean", 0) / sums["clean"]
            if sums.get("clean")
            else float("nan"),
        }
    out["systematic_reported"] = (
        f"{int(sums.get('systematic_reported', 0))} of {int(sums.get('systematic_eligible', 0))} "
        f"eligible (>= {CONTRADICTION_MIN_INSTANCES} instances)"
    )
    out["systematic_reported_before"] = (
        f"{int(sums.get('systematic_reported_before', 0))} of {int(sums.get('systematic_eligible', 0))}"
        f" (rate >= {RATE_BEFORE} alone)"
    )
    out["systematic_reported_class"] = (
        f"{int(sums.get('systematic_reported_class', 0))} of {int(sums.get('systematic_eligible', 0))}"
        " (with the SOP class)"
    )
    out["honest_sources_reported_class"] = (
        f"{int(sums.get('honest_sources_reported_class', 0))} of {int(sums.get('honest_sources', 0))} checks"
        " (with the SOP class)"
    )
    out["honest_sources_reported"] = (
        f"{int(sums.get('honest_sources_reported', 0))} of {int(sums.get('honest_sources', 0))} checks"
    )
    out["honest_sources_reported_before"] = (
        f"{int(sums.get('honest_sources_reported_before', 0))} of {int(sums.get('honest_sources', 0))} checks"
        f" (rate >= {RATE_BEFORE} alone)"
    )
    out["cpu_s_per_1000"] = 1000 * sums["cpu_s"] / sums["sampled"] if sums.get("sampled") else float("nan")
    return out


def scale(n: int, work: Path, out: Path) -> None:
    """Time ``sorter adapt`` on an archive of ``n`` files (see the module docstring)."""
    import resource
    import shutil
    import subprocess

    sys.path.insert(0, str(ROOT / "tests" / "bench"))
    from archive import build

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    built = build(work / "archive", n, "mixed")
    env = {**os.environ, "SORTER_DATABASE_URL": f"sqlite:///{work / 'sorter.db'}"}
    sorter = str(Path(sys.executable).parent / "sorter")
    started = time.perf_counter()
    subprocess.run([sorter, "scan", str(work / "archive"), "--no-progress"], env=env, check=True)
    scan_s = time.perf_counter() - started
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    command = [sorter, "adapt", "--out", str(work / "adapt"), "--per-label", str(n), "--per-series", "100"]
    adapt = subprocess.run([*command, "--no-progress"], env=env, capture_output=True, text=True)
    if adapt.returncode:
        raise SystemExit(f"sorter adapt failed: {adapt.stdout}{adapt.stderr}")
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    from sorter.model.artefact import read_spec

    metrics = read_spec(work / "adapt" / "model.pt")[0].metrics["cross_fitted"]
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "archive": built,
        "scan_wall_s": round(scan_s, 1),
        "adapt_wall_s": round(wall, 1),
        "adapt_cpu_s": round(cpu, 1),
        "sampled": metrics["n"],
        "cross_fitted": {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "label_issues")},
        "adapt_output": adapt.stdout.splitlines()[:8],
    }
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generic", type=Path, help="a finished sorter-train loso run with fold networks")
    parser.add_argument("--scale", type=int, help="time `sorter adapt` on an archive of this many files")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-adapt-scale"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--per-label", type=int, default=2000)
    parser.add_argument("--per-series", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--steps", type=int, default=HeadRecipe.steps, help="head recipe (sorter.adaptation.crossfit)"
    )
    parser.add_argument("--lr", type=float, default=HeadRecipe.lr)
    parser.add_argument("--anchor", type=float, default=HeadRecipe.anchor)
    parser.add_argument(
        "--knn",
        type=int,
        default=0,
        metavar="K",
        help="mix the head's out-of-fold probabilities with K nearest neighbours' (measured, not shipped)",
    )
    parser.add_argument("--knn-weight", type=float, default=0.5, help="the neighbours' share (1 = alone)")
    parser.add_argument(
        "--fold-by",
        choices=("study", "source"),
        default="study",
        help="cross-fit by study (sorter adapt) or hold whole sources out (measured, not shipped)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "tests/bench/results-adapt-2core.json")
    parser.add_argument("--rows", type=Path, help="also write every scored series' scores and evidence here")
    parser.add_argument(
        "--series-towards",
        type=floats,
        default=[],
        metavar="T[,T...]",
        help="also score the series mean rule at these bounds (0 = disagree_at, 1 = agree_at)",
    )
    args = parser.parse_args()
    if args.scale:
        out = (
            args.out
            if args.out != ROOT / "tests/bench/results-adapt-2core.json"
            else ROOT / "tests/bench/results-adapt-scale-2core.json"
        )
        scale(args.scale, args.work, out)
        return
    if args.generic is None:
        parser.error("--generic RUN or --scale N")
    if args.knn < 0 or not 0 < args.knn_weight <= 1:
        parser.error("--knn takes K >= 1 (0: off) and --knn-weight a share in (0, 1]")
    run = args.generic
    config, manifest = load_run_config(run)
    rows = select_rows(manifest, config)
    images = images_for(rows, config, progress=False)
    classes_of_row = {
        index: class_labels(sop_class)
        for index, (_, sop_class) in dicom_headers(rows, (int(r) for r in images.rows)).items()
    }
    fold_of = json.loads((run / "folds.json").read_text())
    labels = [str(v) for v in config.labels]
    point = operating_point(run)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    folds = sorted(set(fold_of.values()))
    per_fold = [
        fold_result(args, run, images, f, fold_of, point, labels, args.repeats, classes_of_row) for f in folds
    ]
    total: dict[str, float] = defaultdict(float)
    for r in per_fold:
        for k, v in r["sums"].items():
            total[k] += v
    accuracy: dict[str, list[float]] = defaultdict(list)
    for r in per_fold:
        for k, v in r["accuracy_by_label"].items():
            accuracy[k].append(v)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "generic_run": str(run),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "overall": summarise(total),
        f"ranked_at_clean_{CLEAN_BUDGET}": budget_ranked(per_fold),
        "adapted_accuracy_true_labels_by_label": {k: float(np.mean(v)) for k, v in sorted(accuracy.items())},
        # each source's mean evidence for its headers: does the systematic source stand out?
        "sources_ranked": source_summary([row for r in per_fold for row in r["source_rows"]]),
        "per_fold": [
            {
                **{k: v for k, v in r.items() if k not in ("sums", "series_scores", "source_rows")},
                "summary": summarise(r["sums"]),
            }
            for r in per_fold
        ],
    }
    args.out.write_text(json.dumps(result, indent=1, default=float))
    if args.rows:  # every scored series, to try other rankings on the same draws
        args.rows.write_text(
            json.dumps([{**r, "fold": f["fold"]} for f in per_fold for r in f["series_scores"]])
        )
    print(
        json.dumps(
            {
                "overall": result["overall"],
                "ranked": result[f"ranked_at_clean_{CLEAN_BUDGET}"],
                "adapted_accuracy": result["adapted_accuracy_true_labels_by_label"],
                "sources_ranked": result["sources_ranked"],
            },
            indent=1,
        )
    )
    for r in result["per_fold"]:
        s = r["summary"]
        print(
            f"fold {r['fold']}: {r['images']} images, {r['series']} series; "
            + ", ".join(
                f"{m} P {s[m]['precision']:.2f} R {s[m]['recall_sporadic']:.2f} "
                f"clean {s[m]['clean_flagged_share']:.3f}"
                for m in METHODS
            )
        )


if __name__ == "__main__":
    main()
