"""Classify a WAV with a `pllcli export` ONNX file: needs only numpy, soundfile, onnxruntime.

    python examples/onnx_classify.py model.onnx clip.wav [--top 3]
"""
import argparse, json
import numpy as np, onnxruntime as ort, soundfile as sf

ap = argparse.ArgumentParser()
ap.add_argument("model"); ap.add_argument("wav"); ap.add_argument("--top", type=int, default=3)
args = ap.parse_args()
sess = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
meta = {k: json.loads(v) for k, v in sess.get_modelmeta().custom_metadata_map.items()}
x, sr = sf.read(args.wav, dtype="float32", always_2d=True)
x = x.mean(axis=1)
if sr != meta["sample_rate"]:  # linear-interpolation resampling keeps this example dependency-free
    x = np.interp(np.arange(0, len(x), sr / meta["sample_rate"]), np.arange(len(x)), x).astype(np.float32)
x = np.pad(x, (0, max(0, meta["min_samples"] - len(x))))
logits, probs = sess.run(["logits", "probs"], {"waveform": x[None]})
for i in np.argsort(-probs[0])[: args.top]:
    print(f"{meta['classes'][i]}\t{probs[0, i]:.4f}")
