"""Score a model (checkpoint + feature store) or a predictions file against ground truth.

Scores
    - checkpoint + feature store: the model runs on every item of the store (which must have
      the checkpoint's feature config hash); probabilities are softmax (single-label task) or
      sigmoid (multi-label) of the logits; frame-level models also give frame probabilities.
    - predictions file (CSV, TSV or JSONL), one of two layouts:
        wide: `id` plus one column per class holding that class's probability;
        long (top-k): `id,label,prob` (or `score`), one or more rows per item, optionally with
        further pairs `label_2,prob_2,...` (the CSV of `pllcli predict --top-k K`), or JSONL
        `{"id", "labels": [...], "probs": [...]}` (its JSONL); classes an item lacks get
        probability 0; an optional `rank` column is ignored.
    - frame scores (`pllcli predict --frame-scores`, see `read_frame_scores`), alone (a clip's
      score per class is its highest frame score) or beside a predictions file.

Ground truth
    - a label store (.h5): clean labels (single-label task), tags (multi-label task), strong
      events, candidate sets (PLL metrics); items without truth for the task are skipped;
      every scored item must be in the store.
    - a table `id,label` (or `labels`), labels joined by ';' for multi-label; every listed id must
      be scored.
    - a strong-event table `id,onset,offset,label` (seconds): clip tags are the event labels;
      every listed id must be scored. Frame / segment / event metrics need frame outputs (a
      frame-level checkpoint or frame scores) or estimated events (`estimated_events`, same
      layout). Collar F1: onset collar `t_collar`, offset collar max(t_collar, 20 % of the event);
      with sed_scores_eval (extra `sed`) also intersection F1 (DTC = GTC = 0.7) and, from frame
      scores, PSDS1 / PSDS2 (`pllcli.metrics.sed`), over the classes that have truth events.
      Overlapping truth events of one class are merged, with a warning naming the line.
    - `candidates`: a label store whose candidate sets are scored against the truth (PLL
      coverage and disambiguation accuracy), when the truth itself is a table.

Class universe: the checkpoint's classes, the predictions file's class columns, or (long
layout) the union of predicted labels, the truth's classes and the label store's classes.
A truth label outside it is an error naming the file and line.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from pllcli.errors import ConfigMismatchError, InputError, MissingExtraError, UsageError

log = logging.getLogger(__name__)

LABEL_SEP = ";"
_PROB_COLUMNS = ("prob", "probability", "score")
_IGNORED_COLUMNS = ("rank",)


# ---------------------------------------------------------------- scores

@dataclass
class Scores:
    ids: list
    classes: list
    probs: "object"                      # np.ndarray (N, C)
    task: str | None = None              # from the checkpoint, None for a predictions file
    frame_probs: dict | None = None      # id -> (T', C)
    frame_hop: dict | None = None        # id -> seconds per output frame
    durations: dict | None = None
    source: dict = field(default_factory=dict)
    is_probability: bool = True


def _examples(items, n=3) -> str:
    items = list(items)
    return ", ".join(repr(str(x)) for x in items[:n]) + (", ..." if len(items) > n else "")


def read_predictions(path, classes_hint=None) -> Scores:
    """Parse a predictions file (wide or long layout, see the module docstring)."""
    import numpy as np
    from pllcli.io import Table
    t = Table(path, required=["id"])
    cols = t.columns
    prob_col = next((c for c in _PROB_COLUMNS if c in cols), None)
    long = ("label" in cols and prob_col is not None) or (t.format == "jsonl" and "labels" in cols
                                                           and "probs" in cols)
    if long:
        rows, labels_seen = _read_long(t, prob_col)
        classes = list(classes_hint) if classes_hint is not None else sorted(labels_seen)
        unknown = [c for c in labels_seen if c not in classes]
        if unknown:
            raise InputError(f"predicted label(s) not among the {len(classes)} classes: {_examples(unknown)}",
                             t.name, field="label")
        ids = list(rows)
        index = {c: i for i, c in enumerate(classes)}
        probs = np.zeros((len(ids), len(classes)))
        for r, item in enumerate(ids):
            for label, v in rows[item].items():
                probs[r, index[label]] = v
        layout = "long"
    else:
        classes = [c for c in cols if c != "id" and c not in _IGNORED_COLUMNS]
        if not classes or ("label" in cols and prob_col is None):
            raise InputError(f"predictions need columns 'id' plus one probability column per class, or "
                             f"'id,label,prob' rows (columns: {', '.join(cols)})", t.name, line=1)
        if classes_hint is not None:
            unknown = [c for c in classes if c not in classes_hint]
            if unknown:
                raise InputError(f"column {unknown[0]!r} is not a known class (known: "
                                 f"{_examples(classes_hint, 5)})", t.name, line=1, field=unknown[0])
        ids, values = [], []
        for ln, row in t.unique_rows("id"):
            item = row["id"]
            ids.append(item)
            values.append([_float(row[c], t.name, ln, c) for c in classes])
        probs = np.asarray(values, dtype=np.float64).reshape(len(ids), len(classes))
        layout = "wide"
    if not ids:
        raise InputError("no predictions (only a header)", t.name)
    is_prob = bool(probs.size and probs.min() >= 0 and probs.max() <= 1)
    return Scores(ids=ids, classes=list(classes), probs=probs, source={"predictions": str(path), "layout": layout},
                  is_probability=is_prob)


def _read_long(t, prob_col):
    """{id: {label: prob}} from rows `id,label,prob[,label_2,prob_2,...]` (the layout of
    `pllcli predict`, one or more rows per id) or JSONL `{"id", "labels": [...], "probs": [...]}`."""
    rows: dict[str, dict[str, float]] = {}
    labels_seen: dict[str, None] = {}

    def put(item, label, v, ln):
        d = rows.setdefault(item, {})
        if label in d:
            raise InputError(f"duplicate prediction for ({item!r}, {label!r})", t.name, line=ln)
        d[label] = v
        labels_seen.setdefault(label, None)

    if prob_col is None:  # JSONL lists
        for ln, obj in t.json_objects():
            try:
                item, labels, probs = str(obj["id"]), obj["labels"], obj["probs"]
            except (KeyError, TypeError) as e:
                raise InputError(f"need an object with id, labels, probs ({type(e).__name__})",
                                 t.name, line=ln) from None
            if not isinstance(labels, list) or not isinstance(probs, list) or len(labels) != len(probs):
                raise InputError("labels and probs must be lists of equal length", t.name, line=ln,
                                 field="probs")
            for label, v in zip(labels, probs):
                put(item, str(label), _float(str(v), t.name, ln, "probs"), ln)
        return rows, labels_seen
    pairs = [("label", prob_col)]
    k = 2
    while f"label_{k}" in t.columns and f"{prob_col}_{k}" in t.columns:
        pairs.append((f"label_{k}", f"{prob_col}_{k}"))
        k += 1
    allowed = {"id", *(c for pr in pairs for c in pr), *_IGNORED_COLUMNS}
    extra = [c for c in t.columns if c not in allowed]
    if extra:
        raise InputError(f"unexpected column {extra[0]!r} in a top-k (id,label,{prob_col}) predictions file",
                         t.name, line=1, field=extra[0])
    for ln, row in t:
        item = row["id"]
        if not item:
            raise InputError("empty id", t.name, line=ln, field="id")
        for lc, pc in pairs:
            label = row[lc]
            if not label:
                if lc == "label":
                    raise InputError("empty label", t.name, line=ln, field="label")
                continue
            put(item, label, _float(row[pc], t.name, ln, pc), ln)
    return rows, labels_seen


def _float(s, name, ln, col) -> float:
    try:
        v = float(s)
    except ValueError:
        raise InputError(f"not a number: {s!r}", name, line=ln, field=col) from None
    if not math.isfinite(v):
        raise InputError(f"not a finite number: {s!r}", name, line=ln, field=col)
    return v


def score_checkpoint(checkpoint, features, *, batch_size: int = 32, device: str = "cpu",
                     chunk: float | None = None, data: str = "auto", max_memory: int | None = None) -> Scores:
    """Run a classifier checkpoint on every item of a feature store (`chunk`: see `predict.predict`;
    `data`/`max_memory`: in memory or streamed, see `training.stream.open_features`)."""
    import numpy as np
    from pllcli.checkpoint import load_model
    from pllcli.features.store import FeatureStore
    from pllcli.runtime import resolve_device
    dev = resolve_device(device)
    model, meta = load_model(checkpoint, device=str(dev))
    fs = FeatureStore(features)
    want = meta.get("feature_config_hash")
    if want and fs.config_hash != want:
        detail = ""
        try:
            from pllcli.features.config import check_compatible
            check_compatible(meta.get("feature_config") or {}, fs.config, f"feature store {features}")
        except ConfigMismatchError as e:
            detail = f" ({e})"
        raise ConfigMismatchError(f"{features}: feature config hash {fs.config_hash} differs from the "
                                  f"checkpoint's {want}{detail}; featurize the audio with the checkpoint's config")
    from pllcli.predict import clip_frame_probs
    from pllcli.training.inference import score_clips
    from pllcli.training.stream import nonfinite_rows, open_features
    classes = [str(c) for c in meta["classes"]]
    task = meta.get("task", "single")
    ids = [str(i) for i in fs.ids]
    durations = np.asarray(fs.durations, dtype=np.float64)
    bad = nonfinite_rows(fs)  # block by block: bounded memory
    if len(bad):
        from pllcli.training.data import nonfinite_error
        raise nonfinite_error(ids, bad, features)
    mem = open_features(fs, data, max_memory, dev)
    probs, res, _ = score_clips(model, meta, mem, fs.config, dev, batch_size, chunk, frames="optional")
    probs = probs.astype(np.float64)
    frame_probs, frame_hop = {}, {}
    if "frame_logits" in res:  # the same frame outputs and hop as `pllcli predict --events`
        fp = 1.0 / (1.0 + np.exp(-res["frame_logits"]))
        for k, item in enumerate(ids):
            t = max(1, int(res["frame_lengths"][k]))
            frame_probs[item], frame_hop[item] = clip_frame_probs(fs.config, float(durations[k]), fp[k, :t])
    return Scores(ids=ids, classes=classes, probs=probs, task=task,
                  frame_probs=frame_probs or None, frame_hop=frame_hop or None,
                  durations=dict(zip(ids, durations.tolist())),
                  source={"checkpoint": str(checkpoint), "features": str(features),
                          "feature_config_hash": fs.config_hash})


# ---------------------------------------------------------------- truth

@dataclass
class Truth:
    path: str
    kind: str                          # "label-store" | "labels" | "strong"
    task: str                          # "single" | "multi"
    ids: list                          # items with truth, file order
    labels: dict                       # id -> class name (single) or frozenset of names (multi)
    line: dict = field(default_factory=dict)   # id -> line number (tables)
    classes: list | None = None        # a label store's class list
    events: dict | None = None         # id -> [(onset, offset, label)]
    candidates: dict | None = None     # id -> frozenset of names (label store)
    universe: set | None = None        # ids the truth source knows (label store: all its ids)
    event_lines: dict | None = None    # id -> line of each event (strong tables)


def read_truth(path) -> Truth:
    """A label store (.h5/.hdf5) or a table (labels or strong events)."""
    p = str(path)
    if p != "-" and Path(p).suffix.lower() in (".h5", ".hdf5", ".hdf"):
        return _truth_from_store(p)
    from pllcli.io import Table
    t = Table(p, required=["id"])
    if "onset" in t.columns or "offset" in t.columns:
        for c in ("onset", "offset", "label"):
            if c not in t.columns:
                raise InputError(f"strong-event truth needs columns id,onset,offset,label; missing {c!r}",
                                 t.name, line=1, field=c)
        events, line, event_lines = {}, {}, {}
        for ln, row in t:
            item = row["id"]
            if not item or not row["label"]:
                raise InputError("empty id or label", t.name, line=ln)
            on, off = _float(row["onset"], t.name, ln, "onset"), _float(row["offset"], t.name, ln, "offset")
            if not 0 <= on < off:
                raise InputError(f"need 0 <= onset < offset, got {on:g}..{off:g}", t.name, line=ln, field="offset")
            _warn_overlap(events.get(item, []), (on, off, row["label"]), item, t.name, ln)
            events.setdefault(item, []).append((on, off, row["label"]))
            event_lines.setdefault(item, []).append(ln)
            line.setdefault(item, ln)
        labels = {i: frozenset(e[2] for e in evs) for i, evs in events.items()}
        return Truth(p, "strong", "multi", list(events), labels, line, events=events, event_lines=event_lines)
    col = "label" if "label" in t.columns else "labels" if "labels" in t.columns else None
    if col is None:
        raise InputError(f"truth needs columns id,label (or id,labels, or id,onset,offset,label); "
                         f"columns: {', '.join(t.columns)}", t.name, line=1, field="label")
    raw, line = {}, {}
    for ln, row in t.unique_rows("id"):
        raw[row["id"]] = [x.strip() for x in row[col].split(LABEL_SEP) if x.strip()]
        line[row["id"]] = ln
    multi = col == "labels" or any(len(v) != 1 for v in raw.values())
    if multi:
        labels = {i: frozenset(v) for i, v in raw.items()}
    else:
        labels = {i: v[0] for i, v in raw.items()}
    return Truth(p, "labels", "multi" if multi else "single", list(raw), labels, line)


def _warn_overlap(previous, event, item, name, line) -> None:
    """Warn (file:line) when `event` overlaps an earlier event of its class in the same clip."""
    on, off, lab = event
    for p_on, p_off, p_lab in previous:
        if p_lab == lab and on < p_off and p_on < off:
            log.warning("%s:%d: event %g-%g s of %r overlaps its earlier %r event %g-%g s; the two are merged "
                        "for scoring", name, line, on, off, item, lab, p_on, p_off)
            return


def _warn_outside(truth: Truth, durations: dict, items, tolerance: float = 0.05) -> None:
    """Warn (file:line) for truth events that end after their clip (known durations only)."""
    for i in items:
        if i not in durations:
            continue
        lines = (truth.event_lines or {}).get(i) or [truth.line.get(i)] * len(truth.events.get(i, []))
        for (on, off, lab), ln in zip(truth.events.get(i, []), lines):
            if off > durations[i] + tolerance:
                log.warning("%s:%s: event %g-%g s (%s) of %r lies outside the clip (duration %.3f s)",
                            truth.path, ln if ln is not None else "-", on, off, lab, i, durations[i])


def _truth_from_store(path) -> Truth:
    import numpy as np
    from pllcli.labels.store import read_label_store
    d = read_label_store(path)
    classes = [str(c) for c in d.classes]
    ids = [str(i) for i in d.ids]
    labels = {}
    if d.task == "multi":
        for r in np.flatnonzero(d.has_tags):
            labels[ids[r]] = frozenset(classes[j] for j in d.tags(int(r)))
    else:
        for r in np.flatnonzero(d.clean >= 0):
            labels[ids[r]] = classes[int(d.clean[r])]
    events = None
    if len(d.strong_item):
        events = {}
        for it, on, off, lab in zip(d.strong_item, d.strong_onset, d.strong_offset, d.strong_label):
            events.setdefault(ids[int(it)], []).append((float(on), float(off), classes[int(lab)]))
        if d.task == "multi":  # items with strong labels count as tagged
            for it, evs in events.items():
                labels.setdefault(it, frozenset(e[2] for e in evs))
    candidates = None
    if d.has_candidates.any():
        candidates = {ids[r]: frozenset(classes[j] for j in d.candidates(int(r)))
                      for r in np.flatnonzero(d.has_candidates)}
    return Truth(path, "label-store", d.task, [i for i in ids if i in labels], labels, classes=classes,
                 events=events, candidates=candidates, universe=set(ids))


def read_events_table(path) -> dict:
    """Estimated events `id,onset,offset,label` -> {id: [(onset, offset, label)]}."""
    tr = read_truth(path)
    if tr.kind != "strong":
        raise InputError("estimated events need columns id,onset,offset,label", str(path), line=1)
    return tr.events


def read_frame_scores(path) -> tuple[list, dict, dict, dict]:
    """Frame scores of `pllcli predict --frame-scores`: a directory of `<id>.tsv` files in the
    sed_scores_eval layout (onset, offset, one column per class) or one table with a leading `id`
    column. -> (classes, {id: (T, C) scores}, {id: seconds per frame}, {id: end of the last frame})."""
    import numpy as np
    from pllcli.io import Table
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.tsv"))
        if not files:
            raise InputError("no <id>.tsv frame-score files in this directory", str(path))
        tables = [(f.stem, Table(f, required=["onset", "offset"])) for f in files]
    else:
        tables = [(None, Table(path, required=["id", "onset", "offset"]))]
    classes, rows = None, {}
    for item, t in tables:
        cls = [c for c in t.columns if c not in ("id", "onset", "offset")]
        if classes is None:
            classes = cls
        elif cls != classes:
            raise InputError(f"class columns differ from the other files' ({', '.join(cls)} vs "
                             f"{', '.join(classes)})", t.name, line=1)
        for ln, row in t:
            cid = item if item is not None else row["id"]
            vals = [_float(row[c], t.name, ln, c) for c in ("onset", "offset", *cls)]
            if vals[1] <= vals[0]:
                raise InputError(f"need onset < offset, got {vals[0]:g}..{vals[1]:g}", t.name, line=ln)
            rows.setdefault(cid, []).append(vals)
    if not classes:
        raise InputError("frame scores need columns onset, offset and one column per class", str(path), line=1)
    scores, hops, ends = {}, {}, {}
    for cid, v in rows.items():
        a = np.asarray(v, dtype=np.float64)
        a = a[np.argsort(a[:, 0], kind="stable")]
        scores[cid] = a[:, 2:]
        hops[cid] = float(np.median(a[:, 1] - a[:, 0]))
        ends[cid] = float(a[-1, 1])
    return classes, scores, hops, ends


def _scores_from_frames(path) -> Scores:
    """Scores whose clip probability per class is its highest frame score."""
    import numpy as np
    classes, fp, hops, ends = read_frame_scores(path)
    ids = list(fp)
    probs = np.stack([fp[i].max(0) for i in ids])
    return Scores(ids=ids, classes=classes, probs=probs, frame_probs=fp, frame_hop=hops, durations=ends,
                  source={"frame_scores": str(path)}, is_probability=bool(probs.min() >= 0 and probs.max() <= 1))


# ---------------------------------------------------------------- evaluation

@dataclass
class Result:
    report: dict
    classes: list
    task: str
    y: "object" = None          # (N,) int or (N, C) bool
    probs: "object" = None      # (N, C)
    curves: dict | None = None  # PSD-ROC per scenario: {"psds1": (etpr, efpr), ...}


def _check_classes(truth: Truth, classes: list) -> None:
    known = set(classes)
    if truth.classes is not None:
        unknown = [c for c in truth.classes if c not in known]
        if unknown:
            raise InputError(f"{len(unknown)} class(es) of the label store are unknown to the model "
                             f"({_examples(unknown)}; model classes: {_examples(classes, 5)})", truth.path,
                             field="classes")
    for item in truth.ids:
        v = truth.labels[item]
        for c in ([v] if isinstance(v, str) else sorted(v)):
            if c not in known:
                raise InputError(f"unknown class {c!r} for id {item!r} (not among the {len(classes)} model "
                                 f"classes: {_examples(classes, 5)})", truth.path, line=truth.line.get(item),
                                 field="label")
    for item, evs in (truth.events or {}).items():
        for e in evs:
            if e[2] not in known:
                raise InputError(f"unknown event class {e[2]!r} for id {item!r}", truth.path,
                                 line=truth.line.get(item), field="label")


def _align(truth: Truth, scores: Scores) -> list:
    """Rows of `scores` to evaluate, in truth order; raises on ids that do not match."""
    index = {i: r for r, i in enumerate(scores.ids)}
    where = scores.source.get("predictions") or scores.source.get("features") or "the scores"
    if truth.universe is not None:  # label store: every scored id must be in it
        missing = [i for i in scores.ids if i not in truth.universe]
        if missing:
            raise InputError(f"{len(missing)} of {len(scores.ids)} ids in {where} are not in the label store "
                             f"(e.g. {_examples(missing)})", truth.path, field="ids")
        items = [i for i in truth.ids if i in index]
    else:  # a truth table lists the test set: every listed id must be scored
        missing = [i for i in truth.ids if i not in index]
        if missing:
            raise InputError(f"{len(missing)} of {len(truth.ids)} truth ids have no prediction in {where} "
                             f"(e.g. {_examples(missing)})", truth.path, line=truth.line.get(missing[0]),
                             field="id")
        items = list(truth.ids)
        extra = len(scores.ids) - len(items)
        if extra:
            log.info("%d scored items have no ground truth and are skipped", extra)
    if not items:
        raise InputError(f"no scored item has a ground-truth label (task {truth.task})", truth.path)
    return items


def evaluate(truth_path, *, checkpoint=None, features=None, predictions=None, estimated_events=None,
             candidates=None, frame_scores=None,
             batch_size: int = 32, device: str = "cpu", threshold: float = 0.5, top_k=(2, 3, 5),
             n_bins: int = 15, t_collar: float = 0.2, percentage_of_length: float = 0.2,
             segment_resolution: float = 1.0, median: "int | str" = 1, chunk: float | None = None,
             data: str = "auto", max_memory: int | None = None) -> Result:
    """Compute every metric that the inputs allow; returns a Result with a JSON-ready report.

    `frame_scores`: frame scores of `pllcli predict --frame-scores` (see `read_frame_scores`),
    instead of or beside a predictions file (without one, a clip's score is its highest frame score)."""
    import numpy as np
    from pllcli.metrics import multi_label, pll, single_label
    files = predictions is not None or frame_scores is not None
    if files and (checkpoint is not None or features is not None):
        raise UsageError("give either a predictions / frame-scores file or a checkpoint with a feature store, "
                         "not both")
    if not files and (checkpoint is None or features is None):
        raise UsageError("need a checkpoint and a feature store (or --predictions FILE / --frame-scores PATH)")
    truth = read_truth(truth_path)
    if candidates is not None:
        cs = _truth_from_store(str(candidates))
        if cs.candidates is None:
            raise InputError("label store has no candidate sets", str(candidates), field="candidates")
        truth.candidates = cs.candidates
    if predictions is not None:
        hint = None
        if truth.classes is not None:
            hint = truth.classes
        scores = read_predictions(predictions, classes_hint=hint)
        if scores.source.get("layout") == "long" and truth.classes is None:  # add truth classes the top-k lists never name
            extra = sorted({c for v in truth.labels.values() for c in ([v] if isinstance(v, str) else v)}
                           - set(scores.classes))
            if extra:
                scores.classes = scores.classes + extra
                scores.probs = np.concatenate([scores.probs, np.zeros((len(scores.ids), len(extra)))], 1)
    elif frame_scores is None:
        scores = score_checkpoint(checkpoint, features, batch_size=batch_size, device=device, chunk=chunk,
                                  data=data, max_memory=max_memory)
    if frame_scores is not None:
        scores = _with_frame_scores(scores if predictions is not None else None, frame_scores, truth)
    classes = scores.classes
    task = scores.task or truth.task
    if scores.task is not None and truth.task != task:
        if task == "multi" and truth.task == "single":  # single labels are valid multi-label tags
            truth.labels = {i: frozenset([v]) for i, v in truth.labels.items()}
            truth.task = "multi"
        else:
            raise InputError(f"the truth has several labels per item but the model is single-label "
                             f"(e.g. id {_examples(i for i, v in truth.labels.items() if len(v) != 1)})",
                             truth.path, field="label")
    _check_classes(truth, classes)
    if truth.kind == "strong":
        # A strong-event table cannot list clips without events: scored clips absent from it are
        # clips with no events (the set of scored clips is the test set, as in sed_eval's file list).
        known = set(truth.ids)
        silent = [i for i in scores.ids if i not in known]
        if silent:
            log.info("%d scored clips have no events in %s and count as event-free", len(silent), truth.path)
            truth.ids = list(truth.ids) + silent
            for i in silent:
                truth.labels[i] = frozenset()
                truth.events[i] = []
    items = _align(truth, scores)
    row = {i: r for r, i in enumerate(scores.ids)}
    rows = np.array([row[i] for i in items])
    probs = scores.probs[rows]
    cindex = {c: k for k, c in enumerate(classes)}
    report = {"task": task, "n_items": len(items), "num_classes": len(classes),
              "inputs": {**scores.source, "truth": str(truth_path), "truth_kind": truth.kind}}
    if task == "single":
        y = np.array([cindex[truth.labels[i]] for i in items])
        clip = single_label.summary(y, probs, classes, top_k=top_k, n_bins=n_bins,
                                    probs=probs if scores.is_probability else None)
    else:
        y = np.zeros((len(items), len(classes)), dtype=bool)
        for r, i in enumerate(items):
            for c in truth.labels[i]:
                y[r, cindex[c]] = True
        clip = multi_label.summary(y, probs, classes, threshold=threshold)
    report["clip"] = clip

    # PLL: candidate sets of a label store against clean / truth labels
    if truth.candidates is not None and task == "single":
        cand_items = [i for i in items if i in truth.candidates]
        if cand_items:
            cm = np.zeros((len(cand_items), len(classes)), dtype=bool)
            for r, i in enumerate(cand_items):
                for c in truth.candidates[i]:
                    cm[r, cindex[c]] = True
            yt = np.array([cindex[truth.labels[i]] for i in cand_items])
            pr = scores.probs[np.array([row[i] for i in cand_items])]
            report["pll"] = {"coverage": pll.candidate_coverage(cm, yt),
                             "disambiguation": pll.disambiguation_accuracy(pr, cm, yt)}

    curves = None
    if truth.events is not None:
        curves = _sed_report(report, truth, scores, items, estimated_events, threshold=threshold, median=median,
                             t_collar=t_collar, percentage_of_length=percentage_of_length,
                             segment_resolution=segment_resolution)
    return Result(report=_clean(report), classes=classes, task=task, y=y, probs=probs, curves=curves)


def _with_frame_scores(scores: "Scores | None", path, truth: Truth) -> Scores:
    """Frame scores from `path` added to `scores` (a predictions file), or scores of their own."""
    import numpy as np
    fs = _scores_from_frames(path)
    known = set(fs.classes)
    want = set(truth.classes) if truth.classes is not None else \
        {e[2] for evs in (truth.events or {}).values() for e in evs}
    if scores is not None:
        want |= set(scores.classes)
    missing, extra = sorted(want - known), sorted(known - want) if truth.classes is not None else []
    if missing or extra:
        raise InputError(f"frame-score classes differ from the truth's (missing: {_examples(missing) or '-'}; "
                         f"extra: {_examples(extra) or '-'})", str(path), line=1)
    if scores is None:
        return fs
    absent = [i for i in scores.ids if i not in fs.frame_probs]
    if absent:
        raise InputError(f"{len(absent)} scored ids have no frame scores (e.g. {_examples(absent)})", str(path))
    cols = [fs.classes.index(c) for c in scores.classes]
    scores.frame_probs = {i: fs.frame_probs[i][:, cols] for i in scores.ids}
    scores.frame_hop = {i: fs.frame_hop[i] for i in scores.ids}
    scores.durations = {i: fs.durations[i] for i in scores.ids}
    scores.source["frame_scores"] = str(path)
    return scores


def _durations(scores: Scores, items, fallback: float, *event_dicts) -> dict:
    """Seconds per item: the clip's duration when known, else the end of its last event."""
    known = scores.durations or {}
    out = {}
    for i in items:
        ends = [float(e[1]) for d in event_dicts for e in d.get(i, [])]
        out[i] = max(ends + [float(known[i])]) if i in known else max(ends, default=fallback)
    return out


def _sed_report(report: dict, truth: Truth, scores: Scores, items, estimated_events, *, threshold: float,
                median: "int | str", t_collar: float, percentage_of_length: float, segment_resolution: float):
    """Frame AUC / F1, segment, collar and intersection F1 and PSDS1 / PSDS2 into `report`.
    -> PSD-ROC curves {scenario: (etpr, efpr)} (None without frame scores or sed_scores_eval)."""
    import numpy as np
    from pllcli.events import decode_events, median_filter, median_frames
    from pllcli.metrics import event_based, frame_based, sed, segment_based
    classes = scores.classes
    ref, _ = sed.merge_overlaps({i: truth.events.get(i, []) for i in items})
    est, fp = None, None
    if estimated_events is not None:
        est_all = read_events_table(estimated_events)
        est = {i: est_all.get(i, []) for i in items}
        report["inputs"]["estimated_events"] = str(estimated_events)
    if scores.frame_probs is not None:
        fp = {i: scores.frame_probs[i] for i in items if i in scores.frame_probs}
        hop = float(np.median([scores.frame_hop[i] for i in fp]))
        fauc = frame_based.auc(fp, ref, classes, hop)
        F, P, R, _ = frame_based.fscore(fp, ref, classes, hop, threshold=threshold)
        report["frame"] = {"hop_seconds": hop, "auc": fauc["macro"], "macro_f1": F["macro_average"],
                           "micro_f1": F["micro_average"], "threshold": threshold,
                           "per_class_auc": fauc["per_class"]}
        if est is None:
            est = {i: [tuple(e) for e in decode_events(fp[i], classes, scores.frame_hop[i], threshold,
                                                       median=median)] for i in fp}
            report["inputs"]["estimated_events"] = f"decoded from frame outputs (threshold {threshold})"
    if est is None:
        return None
    _warn_outside(truth, scores.durations or {}, items)
    dur = _durations(scores, items, segment_resolution, ref, est)
    sF, sP, sR, _ = segment_based.fscore(est, ref, classes, time_resolution=segment_resolution, durations=dur)
    eF, eP, eR, _ = event_based.fscore(est, ref, classes, t_collar=t_collar,
                                       percentage_of_length=percentage_of_length)
    report["segment"] = {"time_resolution": segment_resolution, **sed.stats_dict(sF, sP, sR, None)}
    report["event"] = {"t_collar": t_collar, "percentage_of_length": percentage_of_length,
                       **sed.stats_dict(eF, eP, eR, None)}
    if not sed.available():
        log.warning("PSDS and intersection F1 skipped: pip install 'pllcli[sed]' (sed_scores_eval)")
        report["psds"] = "skipped: sed_scores_eval is not installed (pip install 'pllcli[sed]')"
        return None
    # sed_scores_eval needs truth events for every class it scores: the others are left out
    cols = sed.scored_classes(classes, ref)
    if len(cols) < len(classes):
        log.info("intersection F1 / PSDS: %d class(es) without truth events left out", len(classes) - len(cols))
    sed_classes = [classes[k] for k in cols]
    if not sed_classes:
        return None
    est_df = sed.event_dataframes(sed.merge_overlaps(est)[0], dur, sed_classes)
    report["intersection"] = {"dtc_threshold": 0.7, "gtc_threshold": 0.7, "classes": sed_classes,
                              **sed.stats_dict(*sed.intersection_fscore(est_df, ref, 0.5))}
    if fp is None or len(fp) < len(items):
        return None
    smooth = {i: median_filter(fp[i], median_frames(median, scores.frame_hop[i])) for i in items}
    report["psds"], curves = sed.psds_from_frames(smooth, scores.frame_hop, classes, ref, dur)
    return curves


def _clean(obj):
    """NaN / inf -> None so that the JSON report is standard JSON."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    try:
        import numpy as np
        if isinstance(obj, np.generic):
            return _clean(obj.item())
        if isinstance(obj, np.ndarray):
            return _clean(obj.tolist())
    except ImportError:  # pragma: no cover
        pass
    return obj


# ---------------------------------------------------------------- text output

def render(result: Result, console=None, max_classes: int = 30) -> None:
    """Rich tables: headline figures, then per-class figures."""
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    rep = result.report
    console.print(f"[bold]evaluation[/bold]: {rep['task']}-label, {rep['n_items']} items, "
                  f"{rep['num_classes']} classes")
    t = Table()
    t.add_column("metric")
    t.add_column("value", justify="right")

    def add(name, v):
        t.add_row(name, "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)))
    clip = rep["clip"]
    keys = ["accuracy"] + sorted(k for k in clip if k.startswith("top")) + ["macro_f1", "micro_f1", "ece"] \
        if rep["task"] == "single" else ["mAP", "micro_mAP", "lwlrap", "roc_auc", "micro_roc_auc",
                                         "d_prime", "macro_f1", "micro_f1"]
    for k in keys:
        if k in clip:
            add(k, clip[k])
    if "pll" in rep:
        add("candidate coverage", rep["pll"]["coverage"]["coverage"])
        add("mean candidate set size", rep["pll"]["coverage"]["mean_set_size"])
        add("disambiguation acc (in set)", rep["pll"]["disambiguation"]["restricted"])
    for level in ("frame", "segment", "event", "intersection"):
        if level in rep:
            if level == "frame":
                add("frame AUC", rep[level]["auc"])
            add(f"{level} macro F1", rep[level]["macro_f1"])
            add(f"{level} micro F1", rep[level]["micro_f1"])
    if isinstance(rep.get("psds"), dict):
        for name, r in rep["psds"].items():
            add(name.upper(), r["value"])
    console.print(t)
    pc = clip.get("per_class", {})
    if pc:
        cols = ["precision", "recall", "f1", "support"] if rep["task"] == "single" else \
            ["ap", "roc_auc", "lwlrap", "f1", "support"]
        t2 = Table(title="per class" + (f" ({max_classes} with most support)" if len(pc) > max_classes else ""))
        t2.add_column("class")
        for c in cols:
            t2.add_column(c, justify="right")
        ranked = sorted(pc.items(), key=lambda kv: -(kv[1].get("support") or 0))  # stable: file order
        for name, d in ranked[:max_classes]:
            t2.add_row(name, *["n/a" if d[c] is None else (f"{d[c]:.3f}" if isinstance(d[c], float) else str(d[c]))
                               for c in cols])
        console.print(t2)


# ---------------------------------------------------------------- plots

def read_train_log(path) -> list[dict]:
    rows = []
    p = Path(path)
    if not p.exists():
        raise InputError("no such file", str(path))
    for ln, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"invalid JSON ({e.msg})", str(path), line=ln) from None
        if not isinstance(obj, dict):
            raise InputError("each line must be a JSON object", str(path), line=ln)
        rows.append(obj)
    if not rows:
        raise InputError("empty train log", str(path))
    return rows


def make_plots(result: Result, outdir, train_log=None, max_pr_classes: int = 10) -> list[str]:
    """PNG files in `outdir`: confusion matrix + reliability diagram (single-label), PR curves,
    training curves (with `train_log`). Returns the paths written."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError("matplotlib", "plots", "--plots") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from pllcli.io import atomic_path
    from pllcli.metrics import multi_label, single_label
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    logs = read_train_log(train_log) if train_log else None

    def save(fig, name):
        path = outdir / name
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(str(path))

    classes, probs, y = result.classes, result.probs, result.y
    C = len(classes)
    if result.task == "single":
        cm = np.asarray(result.report["clip"]["confusion_matrix"], dtype=float)
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        size = min(14, 3 + 0.35 * C)
        fig, ax = plt.subplots(figsize=(size, size))
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        if C <= 40:
            ax.set_xticks(range(C), classes, rotation=90, fontsize=7)
            ax.set_yticks(range(C), classes, fontsize=7)
            if C <= 20:
                for i in range(C):
                    for j in range(C):
                        if cm[i, j]:
                            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                                    color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("confusion matrix (rows normalised)")
        fig.colorbar(im, ax=ax, fraction=0.046)
        save(fig, "confusion_matrix.png")
        if "ece" in result.report["clip"]:
            b = single_label.reliability_bins(y, probs)
            fig, ax = plt.subplots(figsize=(5, 5))
            centers = (b["edges"][:-1] + b["edges"][1:]) / 2
            width = b["edges"][1] - b["edges"][0]
            acc = np.nan_to_num(b["accuracy"])
            ax.bar(centers, acc, width=width * 0.95, edgecolor="k", label="accuracy")
            ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
            ax.set_xlabel("confidence")
            ax.set_ylabel("accuracy")
            ax.set_title(f"reliability (ECE {result.report['clip']['ece']:.3f})")
            ax.legend(loc="upper left")
            save(fig, "reliability.png")
        Y = np.zeros((len(y), C), dtype=bool)
        Y[np.arange(len(y)), y] = True
    else:
        Y = y
    support = Y.sum(0)
    top = [c for c in np.argsort(-support, kind="mergesort")[:max_pr_classes] if support[c] > 0]
    fig, ax = plt.subplots(figsize=(6, 5))
    for c in top:
        p, r, _ = multi_label.precision_recall_curve(Y[:, c], probs[:, c])
        ap = multi_label.average_precision(Y[:, [c]], probs[:, [c]])[0]
        ax.step(np.r_[0, r], np.r_[p[0], p], where="post", label=f"{classes[c]} (AP {ap:.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("precision-recall" + (f" ({len(top)} most frequent classes)" if C > len(top) else ""))
    ax.legend(fontsize=7, loc="lower left")
    save(fig, "pr_curves.png")
    if logs:
        xkey = "epoch" if all("epoch" in r for r in logs) else ("step" if all("step" in r for r in logs) else None)
        xs = [r[xkey] for r in logs] if xkey else list(range(1, len(logs) + 1))
        skip = {"epoch", "step", "time_s", "data_wait_share", "items_per_s", "monitor_value", "lr"}
        keys = [k for k in dict.fromkeys(k for r in logs for k in r) if k not in skip
                and all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                        for r in logs if k in r)]
        loss_keys = [k for k in keys if "loss" in k]
        other = [k for k in keys if "loss" not in k]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, ks, title in ((axes[0], loss_keys, "losses"), (axes[1], other, "metrics")):
            for k in ks[:12]:
                pts = [(x, r[k]) for x, r in zip(xs, logs) if k in r]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=k)
            ax.set_xlabel(xkey or "line")
            ax.set_title(title)
            if ks:
                ax.legend(fontsize=7)
        save(fig, "training_curves.png")
    _sed_plots(result, plt, save)
    return written


def _sed_plots(result: Result, plt, save) -> None:
    """psd_roc.png (PSD-ROC of each PSDS scenario) and per_class_f1.png (segment / collar /
    intersection F1 per class) when the report has them."""
    import numpy as np
    rep = result.report
    if result.curves:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for name, (etpr, efpr) in result.curves.items():
            r = rep["psds"][name]
            ax.step(efpr, etpr, where="post", label=f"{name.upper()} {r['value']:.3f} (DTC {r['dtc_threshold']}, "
                    f"GTC {r['gtc_threshold']}, alpha_ct {r['alpha_ct']})")
        ax.set_xlim(0, max(r["max_efpr"] for r in rep["psds"].values()))
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("eFPR (false positives per hour)")
        ax.set_ylabel("eTPR")
        ax.set_title("PSD-ROC")
        ax.legend(fontsize=7, loc="lower right")
        save(fig, "psd_roc.png")
    levels = [lv for lv in ("segment", "event", "intersection") if lv in rep]
    if levels:
        classes = list(rep[levels[0]]["per_class_f1"])
        fig, ax = plt.subplots(figsize=(min(16, 3 + 0.4 * len(classes) * len(levels)), 4))
        w = 0.8 / len(levels)
        x = np.arange(len(classes))
        for k, lv in enumerate(levels):
            vals = [rep[lv]["per_class_f1"].get(c) or 0.0 for c in classes]
            ax.bar(x + k * w, vals, width=w, label=f"{lv} (macro {rep[lv]['macro_f1'] or 0:.3f})")
        ax.set_xticks(x + w * (len(levels) - 1) / 2, classes, rotation=90 if len(classes) > 12 else 0, fontsize=7)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("F1")
        ax.set_title("per-class F1")
        ax.legend(fontsize=7)
        save(fig, "per_class_f1.png")
