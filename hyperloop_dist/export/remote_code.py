"""Make a release self-contained: model code, ``auto_map`` and a tokenizer that transformers loads alone.

``AutoModelForCausalLM.from_pretrained(release, trust_remote_code=True)`` and
``AutoTokenizer.from_pretrained(release)`` then work where only torch, transformers and safetensors are
installed (compressed-tensors too for an INT4 release). The two code files are *generated* from this
package's own modules at export time, never kept as a copy:

* ``configuration_hyperloop.py``: :class:`HCConfig` / :class:`ModelConfig` (from ``config.py``, with the
  kind names they use) and ``export/hf_config.py``;
* ``modeling_hyperloop.py``: ``model/hyper_connections.py``, ``model/layout.py``, ``model/reference.py``,
  ``export/loop_cache.py``, ``export/early_exit.py`` and ``export/hf_model.py``, in that order.

Each module's text is kept as it is, less its ``hyperloop_dist`` imports (the names they bring are defined
earlier in the same file, or imported from the configuration file) and the registration that only the
installed package does. A name defined by two modules, or an import of this package that the generated
files cannot satisfy, stops the export: the files would otherwise not be the package's code.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "configuration_hyperloop.py"
MODELING_FILE = "modeling_hyperloop.py"
AUTO_MAP = {"AutoConfig": "configuration_hyperloop.HyperloopConfig",
            "AutoModelForCausalLM": "modeling_hyperloop.HyperloopForCausalLM"}
PACKAGE = "hyperloop_dist"


@dataclass(frozen=True)
class Piece:
    module: str
    names: tuple[str, ...] | None = None  # None: the whole module
    drop: tuple[str, ...] = ()  # top-level functions left out, with the statements that call them


CONFIG_PIECES = (
    Piece("hyperloop_dist.model.hyper_connections", ("KINDS", "LOOPED_KINDS", "HC_KINDS", "HC_RES_MODES")),
    Piece("hyperloop_dist.config", ("HCConfig", "ModelConfig")),
    Piece("hyperloop_dist.export.hf_config"),
)
MODELING_PIECES = (
    Piece("hyperloop_dist.model.hyper_connections"),
    Piece("hyperloop_dist.model.layout"),
    Piece("hyperloop_dist.model.reference"),
    Piece("hyperloop_dist.export.loop_cache"),
    Piece("hyperloop_dist.export.early_exit"),
    Piece("hyperloop_dist.export.hf_model", drop=("register",)),
)
# hyper_connections' ``Block`` (a callable type, used in annotations only, which stay strings under
# ``from __future__ import annotations``) is rebound by reference.py's ``Block`` module.
ANNOTATION_ONLY = {"Block"}


def _defined(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    if isinstance(node, ast.Assign | ast.AnnAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {t.id for t in targets if isinstance(t, ast.Name)}
    return set()


def _bound(node: ast.Import | ast.ImportFrom) -> set[str]:
    return {(a.asname or a.name).split(".")[0] for a in node.names}


def _is_package_import(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return (node.module or "").split(".")[0] == PACKAGE and node.level == 0
    return isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names)


def _calls(node: ast.stmt, names: tuple[str, ...]) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name) and node.value.func.id in names)


@dataclass
class _Section:
    text: str
    defines: set[str]
    needs: set[str]  # names imported from this package


def _section(piece: Piece) -> _Section:
    """The piece's source, less its package and ``__future__`` imports and the dropped functions."""
    module = importlib.import_module(piece.module)
    source = inspect.getsource(module)
    lines = source.splitlines()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if _is_package_import(node) and node not in tree.body:
            raise ValueError(f"{piece.module}: a nested import of {PACKAGE} (line {node.lineno}) cannot be shipped "
                             "in a release's model code; import it at the top of the module")
    needs = {a.asname or a.name for n in tree.body if _is_package_import(n) for a in n.names}
    if piece.names is None:
        kept = [n for n in tree.body if not _is_package_import(n) and not _calls(n, piece.drop)
                and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")
                and not (_defined(n) & set(piece.drop))]
    else:
        chosen = [n for n in tree.body if _defined(n) & set(piece.names)]
        missing = set(piece.names) - set().union(*map(_defined, chosen))
        if missing:
            raise ValueError(f"{piece.module} defines no {', '.join(sorted(missing))}")
        used = {n.id for c in chosen for n in ast.walk(c) if isinstance(n, ast.Name)}
        imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom) and not _is_package_import(n)
                   and not (isinstance(n, ast.ImportFrom) and n.module == "__future__") and _bound(n) & used]
        kept = imports + chosen
        needs &= used
    text, previous = f"# ---- {piece.module.replace('.', '/')}.py " + "-" * 40, None
    for node in kept:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        kind = "import" if isinstance(node, ast.Import | ast.ImportFrom) else type(node).__name__
        grouped = previous is None or (kind == previous and kind in ("import", "Assign"))
        text += ("\n" if grouped else "\n\n\n") + "\n".join(lines[first - 1: node.end_lineno])
        previous = kind
    defines = set().union(*map(_defined, kept)) if kept else set()
    return _Section(text + "\n", defines, needs)


def _assemble(sections: list[tuple[Piece, _Section]], title: str, provided: set[str], head: str = "") -> str:
    """One module's text; ``provided``: the names ``head`` imports."""
    defined = set(provided)
    for piece, section in sections:
        unresolved = section.needs - defined
        if unresolved:
            raise ValueError(f"{piece.module} imports {', '.join(sorted(unresolved))} from {PACKAGE}, which the "
                             "release's model code does not define; add its module to remote_code's pieces")
        clash = (section.defines & defined) - ANNOTATION_ONLY
        if clash:
            raise ValueError(f"{piece.module} redefines {', '.join(sorted(clash))}, already defined in the release's "
                             "model code; rename one of them")
        defined |= section.defines
    body = "\n\n".join(section.text for _, section in sections)
    return (f'"""{title}\n\nGenerated by `hyperloop export` from the hyperloop_dist modules named in each section '
            'header; do not edit."""\n\n# ruff: noqa: E402, F401, F811, I001  (modules joined in one file)\n'
            'from __future__ import annotations\n\n' + head + body)


def model_code() -> dict[str, str]:
    """The two code files of a release, by file name."""
    config = [(p, _section(p)) for p in CONFIG_PIECES]
    modeling = [(p, _section(p)) for p in MODELING_PIECES]
    config_names = set().union(*(s.defines for _, s in config))
    own = set().union(*(s.defines for _, s in modeling))
    needed = set().union(*(s.needs for _, s in modeling)) - own & config_names
    head = f"from .configuration_hyperloop import {', '.join(sorted(needed))}\n\n" if needed else ""
    return {CONFIG_FILE: _assemble(config, "Hyperloop release configuration (transformers remote code).", set()),
            MODELING_FILE: _assemble(modeling, "Hyperloop release model (transformers remote code).", needed, head)}


def write_tokenizer(model_file: Path, out: Path) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` that reproduce the sentencepiece model's ids.

    Our sentencepiece BPE uses identity normalization and always prepends one ``▁`` (add_dummy_prefix);
    transformers' Llama tokenizer prepends only where the text does not start with a space, which changes
    the ids of text with leading spaces. So the pipeline is written out: normalizer Prepend + Replace,
    no pre-tokenizer, BPE with byte fallback, merges ranked by the merged piece's id (sentencepiece ranks
    BPE pieces by score, in id order). No BOS/EOS is added: training windows have none.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    size = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(size)}
    special = [i for i in range(size) if sp.is_control(i) or sp.is_unknown(i)]
    ranked = sorted((i, vocab[p[:k]], vocab[p[k:]]) for i in range(size) if i not in special and not sp.is_byte(i)
                    for p in [sp.id_to_piece(i)] for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab)
    merges = [(sp.id_to_piece(left), sp.id_to_piece(right)) for _, left, right in ranked]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=sp.id_to_piece(sp.unk_id()), fuse_unk=True,
                        byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in special])

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if 0 <= i < size else None

    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=piece(sp.unk_id()), bos_token=piece(sp.bos_id()),
                            eos_token=piece(sp.eos_id()), pad_token=piece(sp.pad_id()),
                            clean_up_tokenization_spaces=False).save_pretrained(str(out))
    config = out / "tokenizer_config.json"
    # The class name transformers 4.x knows too (5.x writes its new TokenizersBackend name).
    config.write_text(json.dumps({**json.loads(config.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"},
                                 indent=2))


def add_remote_code(release: str | Path) -> None:
    """Write the code files and ``auto_map`` into ``release`` (a release directory being written), and
    the transformers tokenizer where it holds ``tokenizer.model``."""
    release = Path(release)
    for name, text in model_code().items():
        (release / name).write_text(text)
    config = release / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "auto_map": AUTO_MAP}, indent=1))
    if (release / "tokenizer.model").is_file():
        write_tokenizer(release / "tokenizer.model", release)
