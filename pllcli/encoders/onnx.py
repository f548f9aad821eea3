"""ONNX encoders run with onnxruntime: one waveform -> frames graph, or a mel frontend + embedding pair.

Two-stage (Google's speech_embedding as shipped in the openwakeword 0.4.0 wheel): the
`melspec` graph maps (1, S) samples, scaled by `input_scale` (int16 range), to (.., M, F) mel
frames (frame `mel_frame`, hop `mel_hop` samples); the mel is mapped to `mel * mel_scale +
mel_offset`; windows of `window` mel frames every `hop` frames go through the `embedding`
graph, one D-dim vector each. `onnx:DIR` takes DIR/melspectrogram.onnx and
DIR/embedding_model.onnx with those defaults.

Single graph: input (B, S) or (S,), output (B, T', D) or (T', D). `hop` and `min_samples` are
probed from the graph when not declared. Every clip runs on its own (no batch padding), so
its numbers do not depend on its neighbours.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pllcli.encoders import Encoder, file_sha256, register
from pllcli.errors import InputError, MissingExtraError, UsageError

MEL_FILE, EMBEDDING_FILE = "melspectrogram.onnx", "embedding_model.onnx"
# sha256 of the two files in openwakeword-0.4.0-py3-none-any.whl (openwakeword/resources/models/)
SPEECH_EMBEDDING_SHA256 = {
    "melspec": "ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f",
    "embedding": "ba754db3cd768a524c655ea90655ee5e6055a43b8dfd29366a11e93716ae9e51",
}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MissingExtraError("onnxruntime", "export", "an ONNX encoder") from None
    return onnxruntime


class _Session:
    """An onnxruntime session opened lazily and reopened in a forked child (featurize --jobs).

    onnxruntime is not fork-safe: once a process has run a session with an intra-op thread pool
    (more than one thread), a child forked from it hangs for good in its first
    `InferenceSession` (every time on this machine, even after the parent's sessions were
    closed). So the sessions an encoder opens to probe itself are single-threaded and closed
    (`close`), and featurize with workers sets one torch thread per process before the first
    chunk: its sessions open with one thread. Elsewhere (featurize alone, predict, export) a
    session takes torch's thread count; a process that ran one that way must not fork workers
    with the same encoder afterwards (the CLI runs one command per process).
    """

    def __init__(self, path: Path):
        if not path.is_file():
            raise InputError("ONNX encoder file not found (--encoder onnx:...)", str(path))
        self.path, self._sess, self._pid = path, None, None
        self.threads: int | None = 1   # until `close`: the encoder's probing runs

    def close(self) -> None:
        """Drop the session; the next run opens one with torch's thread count."""
        self._sess = self._pid = self.threads = None

    def get(self):
        if self._sess is None or self._pid != os.getpid():
            ort = _ort()
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads or max(1, _torch_threads())
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 4   # failures surface as exceptions, worded here
            try:
                self._sess = ort.InferenceSession(str(self.path), sess_options=opts,
                                                  providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - any load failure is a bad input file
                raise InputError(f"cannot load ONNX graph: {str(e).splitlines()[0][:160]}",
                                 str(self.path)) from None
            self._pid = os.getpid()
        return self._sess

    def run(self, x: np.ndarray) -> np.ndarray:
        s = self.get()
        return s.run(None, {s.get_inputs()[0].name: x})[0]

    def input_rank(self) -> int:
        return len(self.get().get_inputs()[0].shape)

    def __getstate__(self):
        return {"path": self.path, "_sess": None, "_pid": None, "threads": self.threads}


def _torch_threads() -> int:
    try:
        import torch
        return torch.get_num_threads()
    except ImportError:  # pragma: no cover
        return 1


@register("onnx")
class OnnxEncoder(Encoder):
    """ONNX encoder: `source` is a single graph (.onnx) or a folder holding the speech_embedding pair."""

    positional_help = "PATH.onnx|DIR"

    def __init__(self, source: str | None = None, *, melspec: str | None = None,
                 embedding: str | None = None, sample_rate: int = 16000, input_scale: float | None = None,
                 mel_scale: float = 0.1, mel_offset: float = 2.0, window: int = 76, hop: int | None = None,
                 mel_hop: int = 160, mel_frame: int = 512, min_samples: int | None = None,
                 name: str | None = None, **padding):
        super().__init__(**padding)
        if source is not None and Path(source).is_dir():
            melspec = melspec or str(Path(source) / MEL_FILE)
            embedding = embedding or str(Path(source) / EMBEDDING_FILE)
            source = None
        self.two_stage = melspec is not None or embedding is not None
        if self.two_stage and (source is not None or melspec is None or embedding is None):
            raise UsageError("--encoder onnx: give either one graph (onnx:PATH.onnx) or both "
                             "melspec=PATH and embedding=PATH (or onnx:DIR holding "
                             f"{MEL_FILE} and {EMBEDDING_FILE})")
        if not self.two_stage and source is None:
            raise UsageError("--encoder onnx: give a graph (onnx:PATH.onnx), a folder with the "
                             "speech_embedding pair (onnx:DIR) or melspec=PATH,embedding=PATH")
        for k, v in (("sample_rate", sample_rate), ("window", window), ("mel_hop", mel_hop),
                     ("mel_frame", mel_frame), ("hop", hop or 1), ("min_samples", min_samples or 1)):
            if int(v) < 1:
                raise UsageError(f"--encoder onnx: {k} must be >= 1, got {v}")
        self.sample_rate = int(sample_rate)
        if self.two_stage:
            self._mel, self._emb = _Session(Path(melspec)), _Session(Path(embedding))
            self.files = {"melspec": self._mel.path, "embedding": self._emb.path}
            self.input_scale = 32768.0 if input_scale is None else float(input_scale)
            self.mel_scale, self.mel_offset = float(mel_scale), float(mel_offset)
            self.window, self.frame_hop = int(window), int(hop or 8)
            self.mel_hop, self.mel_frame = int(mel_hop), int(mel_frame)
            self.hop = self.frame_hop * self.mel_hop
            self.min_samples = self.mel_frame + (self.window - 1) * self.mel_hop
            known = {k: file_sha256(p) for k, p in self.files.items()} == SPEECH_EMBEDDING_SHA256
            self.name = name or ("speech_embedding" if known else self._emb.path.stem)
        else:
            self._graph = _Session(Path(source))
            self.files = {"graph": self._graph.path}
            self.input_scale = 1.0 if input_scale is None else float(input_scale)
            self.name = name or self._graph.path.stem
            self.hop, self.min_samples = hop, min_samples
            if hop is None or min_samples is None:
                self._probe()
            self._verify_framing()
        self.sha256 = {k: file_sha256(p) for k, p in self.files.items()}
        self.dim = int(self._embed_padded(np.zeros(self.min_samples, np.float32)).shape[1])
        for sess in self._sessions():   # probed on one thread; real work opens its own (see _Session)
            sess.close()

    def _sessions(self) -> list[_Session]:
        return [self._mel, self._emb] if self.two_stage else [self._graph]

    # ------------------------------------------------------------------ identity
    def _declared(self) -> dict:
        d = {"sha256": dict(self.sha256), "input_scale": self.input_scale, "layer": None}
        if self.two_stage:
            d.update(mel_scale=self.mel_scale, mel_offset=self.mel_offset, window=self.window,
                     window_hop=self.frame_hop, mel_hop=self.mel_hop, mel_frame=self.mel_frame)
        return d

    # ------------------------------------------------------------------ compute
    def _run_single(self, x: np.ndarray) -> np.ndarray:
        xin = x * np.float32(self.input_scale) if self.input_scale != 1.0 else x
        out = self._graph.run(xin if self._graph.input_rank() == 1 else xin[None])
        out = out[0] if out.ndim == 3 else out
        if out.ndim != 2:
            raise InputError(f"ONNX encoder output must be (B, T', D) or (T', D), got shape "
                             f"{tuple(out.shape)}", str(self._graph.path))
        return out

    def mel(self, x: np.ndarray) -> np.ndarray:
        """(S,) -> normalised mel frames (M, F) of the two-stage encoder."""
        m = self._mel.run((x * np.float32(self.input_scale))[None])
        m = m.reshape(-1, m.shape[-1])
        return m * np.float32(self.mel_scale) + np.float32(self.mel_offset)

    def windows(self, mel: np.ndarray) -> np.ndarray:
        """(M, F) -> (W, window, F): every `hop`-th window of `window` frames (only whole windows)."""
        v = np.lib.stride_tricks.sliding_window_view(mel, self.window, axis=0)[::self.frame_hop]
        return np.ascontiguousarray(v.transpose(0, 2, 1))

    def _embed_padded(self, x: np.ndarray) -> np.ndarray:
        if not self.two_stage:
            return self._run_single(x)
        w = self.windows(self.mel(x))
        if self._emb.input_rank() == 4:
            w = w[..., None]
        out = self._emb.run(w.astype(np.float32))
        return out.reshape(out.shape[0], -1)

    def _probe(self) -> None:
        """min_samples (smallest length the graph takes, giving >= 1 frame) and hop, from runs."""
        frames = self._frames
        lo, hi = 1, 4 * self.sample_rate
        if frames(hi) < 1:
            raise UsageError(f"--encoder onnx: {self._graph.path} gives no frames for 4 s of audio; "
                             f"declare min_samples= and hop=")
        if self.min_samples is None:
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if frames(mid) >= 1 else (mid + 1, hi)
            self.min_samples = lo
        if self.hop is None:
            t = frames(self.min_samples + self.sample_rate)
            self.hop = max(1, round(self.sample_rate / max(1, t - 1)))

    def _frames(self, s: int) -> int:
        try:
            return int(self._run_single(np.zeros(s, np.float32)).shape[0])
        except InputError:
            raise
        except Exception:  # noqa: BLE001 - the graph refuses this length
            return 0

    def _verify_framing(self) -> None:
        for s in (self.min_samples, self.min_samples + 3 * self.hop + self.hop // 2, 2 * self.sample_rate):
            want = 1 + (s - self.min_samples) // self.hop   # the graph's framing: no min_duration padding
            if self._frames(s) != want:
                raise UsageError(f"--encoder onnx: {self._graph.path} gives {self._frames(s)} frames for "
                                 f"{s} samples, the declared framing (hop {self.hop}, min_samples "
                                 f"{self.min_samples}) says {want}; declare hop= and min_samples=")

    def as_module(self):
        """A torch module running this encoder through onnxruntime, padding short clips as `embed`
        does (eager only, not traceable: export composes the graphs, see `compose_onnx`)."""
        import torch

        enc = self

        class OnnxRuntimeEncoder(torch.nn.Module):
            def forward(self, waveform):  # (B, S) -> (B, T', D)
                rows = [enc.embed(w) for w in waveform.detach().cpu().float().numpy()]
                return torch.from_numpy(np.stack(rows)).to(waveform.device)

        return OnnxRuntimeEncoder()


def extract_speech_embedding(wheel: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract the speech_embedding pair from the openwakeword-0.4.0 wheel into `dest`, checking
    their sha256 (no network). Returns `dest`, ready for `onnx:DEST`."""
    import zipfile
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    members = {"melspec": f"openwakeword/resources/models/{MEL_FILE}",
               "embedding": f"openwakeword/resources/models/{EMBEDDING_FILE}"}
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise InputError(f"cannot open the wheel: {e}", str(wheel)) from None
    with zf:
        for key, member in members.items():
            target = dest / Path(member).name
            try:
                data = zf.read(member)
            except KeyError:
                raise InputError(f"the wheel has no {member} (expected openwakeword==0.4.0)", str(wheel)) from None
            from pllcli.io import atomic_path
            with atomic_path(target) as tmp:
                Path(tmp).write_bytes(data)
            if file_sha256(target) != SPEECH_EMBEDDING_SHA256[key]:
                target.unlink()
                raise InputError(f"{member} has another sha256 than the openwakeword 0.4.0 file", str(wheel))
    return dest


# ---------------------------------------------------------------------- one graph for export

def _const(name: str, values, dtype=np.int64):
    from onnx import numpy_helper
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def _prefixed(model, prefix: str, opset: int):
    """(graph of `model` with every name prefixed, its input name, its output names), at `opset`."""
    import onnx
    from onnx import compose, version_converter
    if model.opset_import and max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) != opset:
        try:
            model = version_converter.convert_version(model, opset)
        except Exception:  # noqa: BLE001 - keep the graph; the checker and parity tests judge it
            model = onnx.ModelProto.FromString(model.SerializeToString())
    model = compose.add_prefix(model, prefix)
    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i.name for i in g.input if i.name not in inits]
    return g, inputs[0], [o.name for o in g.output]


def _pad_glue(encoder: Encoder, h) -> tuple[list, list]:
    """(nodes, initializers): waveform (B, S) -> g/scaled, zero-padded to target_samples as
    `Encoder.embed` pads (centre or end) and multiplied by the input scale."""
    inits = [_const("c/target", [encoder.target_samples]), _const("c/zero", [0]), _const("c/two", [2]),
             _const("c/scale", getattr(encoder, "input_scale", 1.0), np.float32),
             _const("c/Mend", [-1]), _const("c/D", [encoder.dim])]
    left = (h.make_node("Div", ["g/total", "c/two"], ["g/left"]) if encoder.pad == "centre"
            else h.make_node("Identity", ["c/zero"], ["g/left"]))
    nodes = [h.make_node("Shape", ["waveform"], ["g/S"], start=1, end=2),
             h.make_node("Shape", ["waveform"], ["g/B"], start=0, end=1),
             h.make_node("Sub", ["c/target", "g/S"], ["g/short"]),
             h.make_node("Max", ["g/short", "c/zero"], ["g/total"]), left,
             h.make_node("Sub", ["g/total", "g/left"], ["g/right"]),
             h.make_node("Concat", ["c/zero", "g/left", "c/zero", "g/right"], ["g/pads"], axis=0),
             h.make_node("Pad", ["waveform", "g/pads"], ["g/padded"], mode="constant"),
             h.make_node("Mul", ["g/padded", "c/scale"], ["g/scaled"]),
             # frames (..., D) of the encoder -> (B, T', D)
             h.make_node("Concat", ["g/B", "c/Mend", "c/D"], ["g/oshape"], axis=0)]
    return nodes, inits


def _two_stage_glue(encoder: "OnnxEncoder", h, opset: int) -> tuple[list, list, list]:
    """(graphs, nodes, initializers): g/scaled -> mel graph -> mel * scale + offset -> windows
    of `window` frames every `hop` frames (gathered in-graph) -> embedding graph -> g/frames."""
    import onnx
    mg, m_in, m_out = _prefixed(onnx.load(str(encoder.files["melspec"])), "mel/", opset)
    eg, e_in, e_out = _prefixed(onnx.load(str(encoder.files["embedding"])), "emb/", opset)
    f = int(encoder.mel(np.zeros(encoder.min_samples, np.float32)).shape[1])
    tail = [1] if encoder._emb.input_rank() == 4 else []
    inits = [_const("c/ms", encoder.mel_scale, np.float32), _const("c/mo", encoder.mel_offset, np.float32),
             _const("c/hop", encoder.frame_hop), _const("c/one", 1), _const("c/zero0", 0),
             _const("c/winlen", encoder.window), _const("c/wshape", [-1, encoder.window, f] + tail),
             _const("c/ax0", [0]), _const("c/ax1", [1]), _const("g/F", [f])]
    nodes = [h.make_node("Identity", ["g/scaled"], [m_in]),
             # mel (B, 1.., M, F) -> (B, M, F), normalised
             h.make_node("Concat", ["g/B", "c/Mend", "g/F"], ["g/mshape"], axis=0),
             h.make_node("Reshape", [m_out[0], "g/mshape"], ["g/mel3"]),
             h.make_node("Mul", ["g/mel3", "c/ms"], ["g/mel_s"]),
             h.make_node("Add", ["g/mel_s", "c/mo"], ["g/mel_n"]),
             # window starts 0, hop, ... while start + window <= M
             h.make_node("Shape", ["g/mel_n"], ["g/M1"], start=1, end=2),
             h.make_node("Squeeze", ["g/M1", "c/ax0"], ["g/M"]),
             h.make_node("Sub", ["g/M", "c/winlen"], ["g/room"]),
             h.make_node("Add", ["g/room", "c/one"], ["g/stop"]),
             h.make_node("Range", ["c/zero0", "g/stop", "c/hop"], ["g/starts"]),
             h.make_node("Range", ["c/zero0", "c/winlen", "c/one"], ["g/offs"]),
             h.make_node("Unsqueeze", ["g/starts", "c/ax1"], ["g/starts2"]),
             h.make_node("Unsqueeze", ["g/offs", "c/ax0"], ["g/offs2"]),
             h.make_node("Add", ["g/starts2", "g/offs2"], ["g/idx"]),
             h.make_node("Gather", ["g/mel_n", "g/idx"], ["g/wins"], axis=1),     # (B, W, window, F)
             h.make_node("Reshape", ["g/wins", "c/wshape"], [e_in]),
             h.make_node("Reshape", [e_out[0], "g/oshape"], ["g/frames"])]
    return [mg, eg], nodes, inits


def _single_glue(encoder: Encoder, h, opset: int) -> tuple[list, list, list]:
    """(graphs, nodes, initializers): g/scaled -> the waveform -> frames graph -> g/frames."""
    import onnx
    graph = (onnx.load(str(encoder.files["graph"])) if isinstance(encoder, OnnxEncoder)
             else encoder.onnx_graph(opset))
    rank = len(graph.graph.input[0].type.tensor_type.shape.dim)
    sg, s_in, s_out = _prefixed(graph, "enc/", opset)
    nodes = [h.make_node("Identity", ["g/scaled"], [s_in]) if rank == 2
             else h.make_node("Squeeze", ["g/scaled", "c/zero"], [s_in]),
             h.make_node("Reshape", [s_out[0], "g/oshape"], ["g/frames"])]
    return [sg], nodes, []


def compose_onnx(encoder: Encoder, head, head_input: str, opset: int = 17):
    """One ONNX model: waveform (B, S) float at encoder.sample_rate -> the head's outputs.

    `encoder`: an OnnxEncoder (its files are used), or any encoder with `onnx_graph(opset)`
    (a waveform (B, S) -> (B, T', D) ModelProto; torchaudio encoders export themselves).
    `head` (onnx ModelProto) maps `head_input` (B, T', D) to its outputs (e.g. logits, probs),
    whose names are kept. The graph pads short clips as `embed` does (`pad`, `min_duration`),
    scales the input, runs the encoder graph(s) and, for a two-stage encoder, normalises the mel
    and gathers the windows in-graph. All clips of a batch share its length.
    """
    import onnx
    from onnx import helper as h
    if head_input not in [i.name for i in head.graph.input]:
        raise UsageError(f"compose_onnx: the head has no input {head_input!r}")
    nodes, inits = _pad_glue(encoder, h)
    two_stage = isinstance(encoder, OnnxEncoder) and encoder.two_stage
    graphs, more, more_inits = (_two_stage_glue(encoder, h, opset) if two_stage
                                else _single_glue(encoder, h, opset))
    nodes, inits = nodes + more, inits + more_inits
    hg, _, _ = _prefixed(head, "head/", opset)
    graphs.append(hg)
    nodes.append(h.make_node("Identity", ["g/frames"], [f"head/{head_input}"]))
    outputs = []
    for name, out in zip([o.name for o in head.graph.output], hg.output):
        nodes.append(h.make_node("Identity", [out.name], [name]))
        o = onnx.ValueInfoProto()
        o.CopyFrom(out)
        o.name = name
        outputs.append(o)
    for g in graphs:
        nodes += list(g.node)
        inits += list(g.initializer)
    wave = h.make_tensor_value_info("waveform", onnx.TensorProto.FLOAT, ["batch", "samples"])
    graph = h.make_graph(nodes, "pllcli_encoder_head", [wave], outputs, initializer=inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], producer_name="pllcli")
    model.ir_version = max(8, head.ir_version)
    try:
        from onnx import shape_inference
        model = shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is optional; ORT checks the graph
        pass
    return _toposort(model)


def _toposort(model):
    """Nodes in dependency order (the glue nodes reference subgraph outputs)."""
    g = model.graph
    have = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending, ordered = list(g.node), []
    while pending:
        rest = [n for n in pending if not all(i in have for i in n.input)]
        ready = [n for n in pending if all(i in have for i in n.input)]
        if not ready:
            raise UsageError(f"compose_onnx: cannot order the graph (missing {sorted(set(rest[0].input) - have)})")
        for n in ready:
            ordered.append(n)
            have.update(n.output)
        pending = rest
    del g.node[:]
    g.node.extend(ordered)
    return model
