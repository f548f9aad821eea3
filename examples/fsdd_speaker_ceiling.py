"""Why 5 labels per class stay far from full labels on FSDD: coverage of (speaker, digit) pairs
and how well a model transfers a digit to a speaker it has no label of (issue 6 analysis).

    python examples/fsdd_speaker_ceiling.py /work/shared/data/fsdd/recordings --work /work/runs/ssl2 \
        --json /work/runs/ssl2/speaker_ceiling.json

Uses the split stores of `examples/bench_ssl.py` (same --work, --per-class, --seed) and reports:
- coverage: the share of test clips whose (speaker, digit) pair has at least one labelled clip;
- DTW 1-nearest-neighbour on the labelled clips (per-clip mean-normalised log-mel, every 2nd
  frame), accuracy on covered and on uncovered pairs;
- the accuracy of the checkpoints of bench_ssl rows (when present) on covered / uncovered pairs;
- leave-one-speaker-out: trained on every training clip of the other five speakers (full labels,
  the bench's full-labels settings), accuracy on the held-out speaker's test clips: roughly what
  a model can do for a (speaker, digit) pair it has no label of;
- encoder probes: logistic regression (scikit-learn) on the pooled embeddings of the 50
  labelled clips, scored on the test clips, for a randomly initialised encoder and the bench's
  pretrained ones;
- neighbour smoothing: accuracy of the last self-training student on the unlabeled training
  clips before and after averaging its probabilities over each clip's 10 nearest neighbours
  (cosine, pooled embeddings): whether its errors are isolated clips or whole clusters.
`--speakers none` skips the leave-one-speaker-out runs (figures already in --json are kept).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ssl import CLASSES, split_stores  # noqa: E402


def _clips(path):
    from pllcli.features.store import FeatureStore
    fs = FeatureStore(path)
    x, o = fs.load_all()
    ids = [str(i) for i in fs.ids]
    return [x[o[r]:o[r + 1]] for r in range(len(ids))], ids


def dtw_1nn(train, test) -> np.ndarray:
    """Index of the nearest `train` clip for every `test` clip under length-normalised DTW
    (Euclidean frame distance), all pairs at once: (n_test,)."""
    prep = [a[::2] - a.mean(0, keepdims=True) for a in train]
    qs = [a[::2] - a.mean(0, keepdims=True) for a in test]
    nb, na, f = max(len(b) for b in prep), max(len(a) for a in qs), prep[0].shape[1]
    B = np.zeros((len(prep), nb, f), np.float32)
    A = np.zeros((len(qs), na, f), np.float32)
    for k, b in enumerate(prep):
        B[k, :len(b)] = b
    for k, a in enumerate(qs):
        A[k, :len(a)] = a
    la, lb = np.array([len(a) for a in qs]), np.array([len(b) for b in prep])
    C = np.full((len(qs), len(prep), na + 1, nb + 1), np.inf, np.float32)
    C[:, :, 0, 0] = 0
    for i in range(na):
        d = np.sqrt(((A[:, None, i, None, :] - B[None]) ** 2).sum(-1))  # (nA, nB, nb)
        for j in range(nb):
            C[:, :, i + 1, j + 1] = d[:, :, j] + np.minimum(np.minimum(C[:, :, i, j + 1], C[:, :, i + 1, j]), C[:, :, i, j])
    dist = C[np.arange(len(qs))[:, None], np.arange(len(prep))[None], la[:, None], lb[None]] / (la[:, None] + lb[None])
    return dist.argmin(1)


def _infer(model, clips, outputs=("logits",)) -> dict:
    """`pllcli.predict.infer` on a list of (T, F) clips, batched as `pllcli evaluate` batches them."""
    from pllcli.predict import infer
    from pllcli.training.data import InMemoryFeatures
    mem = InMemoryFeatures(np.concatenate(clips), np.concatenate([[0], np.cumsum([len(a) for a in clips])]))
    return infer(model, mem, None, "cpu", 128, outputs=outputs)


def predict_digits(ckpt, clips) -> np.ndarray:
    from pllcli.checkpoint import load_model
    model, meta = load_model(ckpt)
    return np.array([int(meta["classes"][k]) for k in _infer(model, clips)["logits"].argmax(1)])


def encoder_probes(work, few, y_few, test, y_test, model_options) -> dict:
    """Logistic-regression accuracy on pooled embeddings: random init and the pretrained encoders."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from pllcli.checkpoint import encoder_state, load_checkpoint
    from pllcli.models import build_model
    out = {}
    cands = {"random init": None, **{f"{p.stem}": p for p in sorted(work.glob("enc_*_v2.pt"))}}
    for name, path in cands.items():
        torch.manual_seed(0)
        model = build_model("convgru", few[0].shape[1], len(CLASSES), **model_options)
        if path is None:
            x = np.concatenate(few)
            model.encoder.norm.set_stats(x.mean(0), x.std(0))
        else:
            state, meta = load_checkpoint(path)
            model.encoder.load_state_dict(encoder_state(state, meta), strict=False)
        model.eval()
        ef, et = (_infer(model, c, ("logits", "embedding"))["embedding"] for c in (few, test))
        sc = StandardScaler().fit(ef)
        clf = LogisticRegression(max_iter=3000).fit(sc.transform(ef), y_few)
        out[name] = float(clf.score(sc.transform(et), y_test))
    return out


def neighbour_smoothing(ckpt, clips, y, k: int = 10) -> dict:
    from pllcli.checkpoint import load_model
    from pllcli.predict import probabilities
    model, meta = load_model(ckpt)
    res = _infer(model, clips, ("logits", "embedding"))
    p = probabilities(res["logits"])
    e = res["embedding"] / np.linalg.norm(res["embedding"], axis=1, keepdims=True)
    nn = np.argsort(-(e @ e.T), axis=1)[:, :k]
    classes = np.array([int(c) for c in meta["classes"]])
    return {"k": k, "plain": float((classes[p.argmax(1)] == y).mean()),
            "smoothed": float((classes[p[nn].mean(1).argmax(1)] == y).mean())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--work", default="/work/runs/ssl2")
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speakers", default="all", help="comma list for the leave-one-speaker-out runs")
    ap.add_argument("--epochs", type=int, default=15, help="epochs of each leave-one-speaker-out run")
    ap.add_argument("--model-opt", default="width=16,rnn_hidden=64,proj=96")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    from pllcli.labels.store import LabelData, write_label_store
    from pllcli import spec
    from pllcli.models import model_builder
    from pllcli.training.trainer import TrainConfig, train
    torch.set_num_threads(args.threads)
    mopt = spec.coerce(model_builder("convgru"), spec.parse_pairs(args.model_opt, "--model-opt"), "--model-opt",
                       skip=("n_mels", "num_classes"), what="model convgru")
    work = Path(args.work)
    store = work / "fsdd.h5"
    if not store.exists():
        sys.exit(f"{store} not found: run examples/bench_ssl.py with --work {work} first")
    paths, sizes = split_stores(work, store, args.per_class, args.seed)
    few, few_ids = _clips(paths["few"][0])
    test, test_ids = _clips(paths["test"][0])
    digit = lambda i: int(i.split("_")[0])  # noqa: E731
    speaker = lambda i: i.split("_")[1]  # noqa: E731
    y = np.array([digit(i) for i in test_ids])
    spk = np.array([speaker(i) for i in test_ids])
    pairs = {(digit(i), speaker(i)) for i in few_ids}
    covered = np.array([(digit(i), speaker(i)) in pairs for i in test_ids])
    report = {"sizes": sizes, "coverage": float(covered.mean()), "models": {}, "leave_one_speaker_out": {}}

    def split_acc(pred):
        ok = pred == y
        return {"all": float(ok.mean()), "covered": float(ok[covered].mean()), "uncovered": float(ok[~covered].mean())}

    t = time.time()
    nn = dtw_1nn(few, test)
    report["models"]["DTW 1-NN on the labelled clips"] = split_acc(np.array([digit(few_ids[k]) for k in nn]))
    report["dtw_seconds"] = round(time.time() - t, 1)
    for row in ("supervised", "fixmatch", "selftrain_r6", "full_labels"):
        ck = work / f"run_{row}" / "last.pt"
        if ck.exists():
            report["models"][f"bench_ssl run_{row}"] = split_acc(predict_digits(ck, test))

    report["encoder_probes"] = encoder_probes(work, few, [digit(i) for i in few_ids], test, y,
                                              mopt)
    st = work / "run_selftrain_r6" / "last.pt"
    if st.exists():
        semi, semi_ids = _clips(paths["semi"][0])
        report["neighbour_smoothing"] = neighbour_smoothing(st, semi, np.array([digit(i) for i in semi_ids]))

    full_feats, _ = paths["full"]
    _, full_ids = _clips(full_feats)
    speakers = [] if args.speakers == "none" else \
        sorted(set(spk)) if args.speakers == "all" else args.speakers.split(",")
    if args.json and Path(args.json).exists() and not speakers:
        old = json.loads(Path(args.json).read_text())
        report["leave_one_speaker_out"] = old.get("leave_one_speaker_out", {})
    aug = {"time_masks": 2, "time_width": 0.15, "freq_masks": 2, "freq_width": 8, "freq_warp": 0.1, "time_warp": 0.2}
    for s in speakers:
        lp = work / f"loso_{s}_labels.h5"
        write_label_store(lp, LabelData.new(full_ids, CLASSES, clean=[-1 if speaker(i) == s else digit(i)
                                                                      for i in full_ids]), {"bench": "loso"})
        out = work / f"run_loso_{s}"
        shutil.rmtree(out, ignore_errors=True)
        train(TrainConfig(features=str(full_feats), labels=str(lp), outdir=str(out), model="convgru",
                          model_options=mopt, objectives=["ce"], epochs=args.epochs,
                          valid_fraction=0.0, seed=args.seed, device="cpu", progress=False, threads=args.threads,
                          lr=3e-3, top_k=0, augment=aug, clean_share=0.0))
        ok = predict_digits(out / "last.pt", test) == y
        report["leave_one_speaker_out"][s] = {"held_out": float(ok[spk == s].mean()),
                                              "others": float(ok[spk != s].mean())}
        print(f"leave out {s:10s} held-out speaker {ok[spk == s].mean():.3f}  others {ok[spk != s].mean():.3f}",
              file=sys.stderr, flush=True)
    lo = [v["held_out"] for v in report["leave_one_speaker_out"].values()]
    report["leave_one_speaker_out_mean"] = float(np.mean(lo)) if lo else None

    print(f"\nFSDD, {args.per_class} labels per class (seed {args.seed}): {covered.mean():.3f} of the test clips "
          f"are (speaker, digit) pairs with a label")
    print(f"{'model':40s} {'all':>6s} {'covered':>8s} {'uncovered':>10s}")
    for k, v in report["models"].items():
        print(f"{k:40s} {v['all']:6.3f} {v['covered']:8.3f} {v['uncovered']:10.3f}")
    for k, v in report["encoder_probes"].items():
        print(f"linear probe (logistic regression), {k:28s} {v:.3f}")
    if "neighbour_smoothing" in report:
        ns = report["neighbour_smoothing"]
        print(f"self-training student on the unlabeled clips: {ns['plain']:.3f}, "
              f"averaged over 10 nearest neighbours {ns['smoothed']:.3f}")
    if lo:
        print(f"leave-one-speaker-out (full labels of the other 5): held-out speaker {np.mean(lo):.3f} "
              f"(min {min(lo):.3f}, max {max(lo):.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
