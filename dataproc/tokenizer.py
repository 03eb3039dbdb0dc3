"""Stage 2, `zerolm tokenizer train`: a byte-level BPE vocabulary from the clean corpus.

Reads CLEAN_DIR/data/*.parquet (the `text` column only, streamed batch by batch, so the
corpus never has to fit in memory), trains BPE with the `tokenizers` library and writes
TOK_DIR/ with tokenizer.json, tokenizer_config.json and special_tokens_map.json, which
`transformers.AutoTokenizer.from_pretrained(TOK_DIR)` loads without remote code, plus
report.json (compression per source and per language, see dataproc.tokenizer_report).

Token ids: the learned BPE vocabulary comes first, the three special tokens are always
the last three ids: <|endoftext|> (document separator, pad), <|im_start|>, <|im_end|>.
`load_tokenizer_dir` / `TokenizerInfo` are what later stages (pack, train, serve) use.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from zerolm.config import StrictModel, config_hash
from zerolm.errors import UserError
from zerolm.lineage import describe
from zerolm.stage import OWNER, SUCCESS, StageDir, require_done, write_json_atomic

STAGE = "tokenizer"
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# The files of a tokenizer folder that travel with it (token folders, HF exports).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json")  # in id order, at the end of the vocabulary
N_BYTES = 256  # the byte-level alphabet: every byte has a token, so nothing is unknown
MIN_VOCAB_SIZE = N_BYTES + len(SPECIAL_TOKENS) + 41  # leave room for some merges

# Pre-tokenization splits text into chunks that BPE merges never cross. "zh_en" is the
# GPT-4 (cl100k) pattern with one change: Han runs are split from other letters, so no
# token straddles scripts ("用Python" -> "用" | "Python"). Digits go in groups of <= 3;
# a run of letters may take one leading punctuation mark ("，中国", "(the"), which on
# our zh/en test data compresses Chinese ~3% better than GPT-2's pattern (see report).
ZH_EN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)"""
    r"""|[^\r\n\p{L}\p{N}]?[\p{L}&&[^\p{Han}]]+"""
    r"""|[^\r\n\p{L}\p{N}]?\p{Han}+"""
    r"""|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


class TokenizerConfig(StrictModel):
    """Config of `zerolm tokenizer train`."""

    input: str  # CLEAN_DIR, the finished output of `zerolm data run`
    output: str  # TOK_DIR
    vocab_size: int = 32000  # total, including the 3 special tokens
    min_frequency: int = Field(default=2, ge=1)  # a pair seen fewer times is never merged
    # Training sample cap. A corpus larger than this is sampled uniformly (seeded), not
    # cut after the first files, so every source is represented.
    max_chars: int = Field(default=200_000_000, ge=1)
    max_docs: Optional[int] = Field(default=None, ge=1)
    batch_size: int = Field(default=1000, ge=1)  # parquet rows per batch fed to the trainer
    # "gpt2" (GPT-2's byte-level regex) is kept to compare against, not as a default.
    pretokenizer: Literal["zh_en", "gpt2"] = "zh_en"
    default_system_prompt: Optional[str] = None  # inserted by the chat template
    model_max_length: int = Field(default=2048, ge=1)
    seed: int = 0
    report_docs_per_source: int = Field(default=2000, ge=1)  # docs per source in report.json

    @field_validator("vocab_size")
    @classmethod
    def _vocab_fits_bytes(cls, value: int) -> int:
        if value < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size must be at least {MIN_VOCAB_SIZE}: {N_BYTES} byte tokens + "
                f"{len(SPECIAL_TOKENS)} special tokens + room for merges"
            )
        return value


def chat_template(default_system_prompt: Optional[str] = None) -> str:
    """ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message; with
    add_generation_prompt, `<|im_start|>assistant\\n` at the end. When the first message
    is not a system message and a default system prompt is set, it is inserted first."""
    head = ""
    if default_system_prompt:
        # json.dumps gives a valid Jinja string literal (Jinja unescapes like Python).
        literal = json.dumps(default_system_prompt, ensure_ascii=False)
        head = (
            "{% if messages|length == 0 or messages[0]['role'] != 'system' %}"
            f"{IM_START}system\n{{{{ {literal} }}}}{IM_END}\n"
            "{% endif %}"
        )
    return (
        head
        + "{% for message in messages %}"
        + f"{IM_START}{{{{ message['role'] }}}}\n{{{{ message['content'] }}}}{IM_END}\n"
        + "{% endfor %}"
        + f"{{% if add_generation_prompt %}}{IM_START}assistant\n{{% endif %}}"
    )


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    """The tokenizer files of src (a tokenizer, tokens or model folder) into dst."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def build_empty_tokenizer(pretokenizer: str = "zh_en") -> Tokenizer:
    """Byte-level BPE with no merges yet. No normalizer: the clean stage already
    normalized the text, and decode(encode(x)) must give x back byte for byte."""
    tok = Tokenizer(models.BPE())
    if pretokenizer == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(ZH_EN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    return tok


# ---------------------------------------------------------------- reading the corpus

def corpus_files(clean_dir: Path) -> list[Path]:
    """The clean corpus' parquet files in a fixed order; each checked for a string
    `text` column. Raises UserError naming the first bad file."""
    files = sorted((clean_dir / "data").rglob("*.parquet"))
    if not files:
        raise UserError(f"{clean_dir}/data holds no parquet files: the clean corpus is empty")
    for path in files:
        try:
            schema = pq.ParquetFile(path).schema_arrow
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"{path} is not a readable parquet file: {exc}") from None
        if "text" not in schema.names:
            raise UserError(f"{path} has no 'text' column (columns: {', '.join(schema.names)})")
        kind = schema.field("text").type
        # A null-typed column is what an empty or all-null table infers: no text, no error.
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            raise UserError(f"{path}: column 'text' is {kind}, expected string")
    return files


def iter_text_batches(files: list[Path], batch_size: int, columns=("text",)) -> Iterator[pa.RecordBatch]:
    for path in files:
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=list(columns))


def keep_rate(files: list[Path], cfg: TokenizerConfig) -> float:
    """Fraction of documents to keep so the sample spreads over the whole corpus.
    Size comes from parquet metadata (no full read): the text column's uncompressed
    bytes, converted to chars with the chars/byte ratio of the first batch."""
    rows, nbytes = 0, 0
    for path in files:
        meta = pq.ParquetFile(path).metadata
        rows += meta.num_rows
        for i in range(meta.num_row_groups):
            group = meta.row_group(i)
            nbytes += sum(group.column(j).total_uncompressed_size for j in range(group.num_columns)
                          if group.column(j).path_in_schema == "text")
    if rows == 0:
        raise UserError(f"{cfg.input}: the clean corpus has no rows")
    ratio = 1.0
    for batch in iter_text_batches(files, 1000):
        texts = [t for t in batch.column(0).to_pylist() if t]
        if texts:
            ratio = sum(map(len, texts)) / max(1, sum(len(t.encode("utf-8")) for t in texts))
            break
    rate = min(1.0, cfg.max_chars / max(1.0, nbytes * ratio))
    if cfg.max_docs is not None:
        rate = min(rate, cfg.max_docs / rows)
    return rate


def sample_texts(files: list[Path], cfg: TokenizerConfig, rate: float, counts: dict) -> Iterator[list[str]]:
    """Yield lists of non-empty texts, in file order, keeping each document with
    probability `rate` (seeded), until max_chars / max_docs is reached. Fills `counts`."""
    rng = np.random.default_rng(cfg.seed)
    counts.update(docs=0, chars=0, bytes=0, keep_rate=round(rate, 6), capped=False)
    for batch in iter_text_batches(files, cfg.batch_size):
        texts = batch.column(0).to_pylist()
        if rate < 1.0:
            keep = rng.random(len(texts)) < rate
            texts = [t for t, k in zip(texts, keep) if k]
        out = []
        for text in texts:
            if not text or text.isspace():
                continue
            out.append(text)
            counts["docs"] += 1
            counts["chars"] += len(text)
            counts["bytes"] += len(text.encode("utf-8"))
            if counts["chars"] >= cfg.max_chars or counts["docs"] == cfg.max_docs:
                counts["capped"] = True
                break
        if out:
            yield out
        if counts["capped"]:
            return


# ---------------------------------------------------------------- training

def train_tokenizer(cfg: TokenizerConfig, *, overwrite: bool = False, show_progress: bool = False,
                    echo=print) -> dict:
    """Train, save and report. Returns the report (also in TOK_DIR/report.json); a
    rerun with the same config and the same clean corpus returns the saved report."""
    from dataproc.tokenizer_report import compression_report, format_report_table

    clean_dir, out_dir = Path(cfg.input), Path(cfg.output)
    data_info = require_done(clean_dir, "data")
    if out_dir.resolve() == clean_dir.resolve() or clean_dir.resolve() in out_dir.resolve().parents:
        raise UserError(f"output {out_dir} must not be the clean corpus folder or inside it")
    files = corpus_files(clean_dir)
    rate = keep_rate(files, cfg)  # before begin(): an empty corpus leaves no output folder
    chash = config_hash({"config": cfg.model_dump(mode="json", exclude={"output"}),
                         "data": data_info.get("config_hash")})
    stage = StageDir(out_dir, STAGE, chash)
    if not stage.begin(overwrite=overwrite):
        echo(f"{out_dir} is already done with this config and this corpus (nothing to do)")
        return json.loads((out_dir / "report.json").read_text(encoding="utf-8"))

    tok = build_empty_tokenizer(cfg.pretokenizer)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size - len(SPECIAL_TOKENS), min_frequency=cfg.min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
        show_progress=show_progress,
    )
    counts: dict = {}
    started = time.time()
    tok.train_from_iterator(sample_texts(files, cfg, rate, counts), trainer=trainer)
    train_s = time.time() - started
    if counts.get("docs", 0) == 0:
        raise UserError(f"{clean_dir}: the clean corpus has no non-empty text to train on")

    learned = tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    ids = [tok.token_to_id(s) for s in SPECIAL_TOKENS]
    if ids != list(range(learned, learned + len(SPECIAL_TOKENS))):  # a bug, not a user error
        raise RuntimeError(f"special tokens got ids {ids}, expected the last ids after {learned}")
    if learned < cfg.vocab_size - len(SPECIAL_TOKENS):
        echo(f"warning: the corpus only supports {learned + 3} tokens (asked {cfg.vocab_size}); "
             "the vocabulary is smaller than requested")

    tok.save(str(out_dir / "tokenizer.json"))
    write_hf_files(out_dir, model_max_length=cfg.model_max_length,
                   default_system_prompt=cfg.default_system_prompt)
    info = tokenizer_info(out_dir, _allow_unfinished=True)

    report = compression_report(out_dir, clean_dir, cfg.report_docs_per_source)
    report["vocab_size_requested"] = cfg.vocab_size
    report["pretokenizer"] = cfg.pretokenizer
    report["training"] = {"seconds": round(train_s, 2), "files": len(files), **counts}
    report["sha256"] = info.sha256
    write_json_atomic(out_dir / "report.json", report)
    (out_dir / "config.json").write_text(cfg.model_dump_json(indent=2), encoding="utf-8")
    stage.finish(vocab_size=info.vocab_size, sha256=info.sha256, inputs=[describe("clean", clean_dir)])
    echo(format_report_table(report))
    return report


def write_hf_files(out_dir: Path, *, model_max_length: int, default_system_prompt: Optional[str] = None,
                   eos_token: str = ENDOFTEXT) -> None:
    """tokenizer_config.json + special_tokens_map.json in the format both transformers 4
    and 5 load as PreTrainedTokenizerFast. Like Qwen2's base tokenizer: no bos, eos = pad
    = <|endoftext|> (the document separator pretraining packs with). A chat model's
    export may pass eos_token=<|im_end|>, the token ending an assistant turn."""
    tok = json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8"))
    added = {str(t["id"]): {"content": t["content"], "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True} for t in tok["added_tokens"]}
    extra = [IM_START, IM_END]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None, "eos_token": eos_token, "pad_token": ENDOFTEXT, "unk_token": None,
        # transformers 5 reads this as extra_special_tokens; 4.x expects that key to be a dict.
        "additional_special_tokens": extra,
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "model_max_length": model_max_length,
        "chat_template": chat_template(default_system_prompt),
    }
    write_json_atomic(out_dir / "tokenizer_config.json", config)
    write_json_atomic(out_dir / "special_tokens_map.json",
                      {"eos_token": eos_token, "pad_token": ENDOFTEXT, "additional_special_tokens": extra})


# ---------------------------------------------------------------- for later stages

@dataclass(frozen=True)
class TokenizerInfo:
    """What pack / train / serve need to know about a tokenizer folder."""

    path: str
    sha256: str  # of tokenizer.json: a token file is only valid with the same vocabulary
    vocab_size: int
    eos_id: int  # <|endoftext|>: appended after every document when packing
    pad_id: int
    im_start_id: int
    im_end_id: int
    specials: dict  # token -> id
    stop_ids: tuple  # generation stops on any of these (<|im_end|>, <|endoftext|>)
    model_max_length: Optional[int]
    chat_template: Optional[str]

    @property
    def token_dtype(self) -> str:
        return "uint16" if self.vocab_size <= 1 << 16 else "uint32"

    def to_dict(self) -> dict:
        return asdict(self)


def load_tokenizer_dir(tok_dir: str | Path, *, encode_special_tokens: bool = False,
                       _allow_unfinished: bool = False) -> Tokenizer:
    """The `tokenizers.Tokenizer` of a tokenizer folder (a TOK_DIR, or an hf/ export).
    A missing folder, a half-written stage output or a folder without a loadable
    tokenizer.json is a UserError. encode_special_tokens=True encodes a literal
    "<|im_end|>" inside text as plain text: what packing corpus text needs, so web
    pages can never inject control tokens (chat formatting wants the default, False)."""
    tok_dir = Path(tok_dir)
    if not tok_dir.is_dir():
        raise UserError(f"tokenizer folder {tok_dir} does not exist")
    if (tok_dir / OWNER).exists() and not (tok_dir / SUCCESS).exists() and not _allow_unfinished:
        raise UserError(f"{tok_dir} is an unfinished tokenizer run (no {SUCCESS}; was it interrupted?)")
    path = tok_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{tok_dir} is not a tokenizer folder (no tokenizer.json)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception on malformed JSON
        raise UserError(f"{path} is not a valid tokenizer: {str(exc).splitlines()[0]}") from None
    tok.encode_special_tokens = encode_special_tokens
    return tok


def tokenizer_info(tok_dir: str | Path, *, _allow_unfinished: bool = False) -> TokenizerInfo:
    tok_dir = Path(tok_dir)
    tok = load_tokenizer_dir(tok_dir, _allow_unfinished=_allow_unfinished)
    specials = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
    missing = [s for s, i in specials.items() if i is None]
    if missing:
        raise UserError(f"{tok_dir} is not a zerolm tokenizer: it lacks {', '.join(missing)}")
    try:
        hf = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        hf = {}
    return TokenizerInfo(
        path=str(tok_dir), sha256=hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest(),
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        eos_id=specials[ENDOFTEXT], pad_id=specials[ENDOFTEXT],
        im_start_id=specials[IM_START], im_end_id=specials[IM_END], specials=specials,
        stop_ids=(specials[IM_END], specials[ENDOFTEXT]),
        model_max_length=hf.get("model_max_length"), chat_template=hf.get("chat_template"),
    )


def token_byte_lengths(tok_dir: str | Path) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for (0 for special tokens), so a loss in
    nats per token becomes bits per byte: bpb = sum(nats) / (ln 2 * sum(bytes)).
    Byte-level BPE maps every byte to one character of its alphabet, so a token's byte
    count is the length of its token string."""
    tok = load_tokenizer_dir(tok_dir, _allow_unfinished=True)
    model = json.loads(tok.to_str())
    if (model.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"{tok_dir}: bits per byte needs a byte-level BPE tokenizer")
    specials = {t["id"] for t in model.get("added_tokens", []) if t.get("special")}
    out = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        out[i] = 0 if i in specials else len(token)
    return out
