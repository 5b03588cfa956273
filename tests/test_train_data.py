"""Training data formats, packing and document masking (`train/data.py`, `train/sources.py`, `train/masking.py`).

References: transformers' own `apply_chat_template(..., return_assistant_tokens_mask=True)` (the bundled template
carries `{% generation %}` markers, which the trainer does not use); prompt/completion labels built by hand from
the tokenizer; the same records read as JSONL, .txt, parquet and a saved HF dataset give the same stream; a packed
window under block-causal masking gives the same logits as each document run alone; 2 ranks each reading and
tokenizing only their share train on the 1-rank run's batches, also after a resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from automodel_convert.train.config import TrainError
from automodel_convert.train.data import Packed, Stream, chat_example, to_example, tokenize, window_fields
from automodel_convert.train.sources import records, resolve

from conftest import FIXTURES, fixture_path
from spawn_ranks import init_gloo, run_ranks

CHAT = FIXTURES / "chat"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(CHAT)


def chats() -> list[list[dict]]:
    convs = [json.loads(line)["messages"] for line in (CHAT / "chat.jsonl").read_text().splitlines()[:12]]
    convs.append([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": "c"}, {"role": "assistant", "content": "dd"}])  # two assistant turns
    return convs


def test_chat_labels_are_the_assistant_tokens_of_transformers(tok):
    for messages in chats():
        ref = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = chat_example(messages, tok)
        assert ids == list(ref["input_ids"])
        assert mask == [bool(m) for m in ref["assistant_masks"]], messages
        assert any(mask) and not all(mask)


def test_packed_labels_are_transformers_assistant_tokens_end_to_end(tok):
    """The trainer's path (JSONL -> tokenize -> packed windows) against a stream built only from transformers'
    `apply_chat_template(return_assistant_tokens_mask=True)`: every window's inputs and `shift_labels` (the next
    token where transformers marks it an assistant token of the same conversation, else -100)."""
    convs = [json.loads(line)["messages"] for line in (CHAT / "eval.jsonl").read_text().splitlines()]
    ref_ids, ref_target, ref_doc = [], [], []
    for d, messages in enumerate(convs):
        ref = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ref_ids += list(ref["input_ids"])
        ref_target += [bool(m) for m in ref["assistant_masks"]]
        ref_doc += [d] * len(ref["input_ids"])
    stream = tokenize(records(resolve(str(CHAT / "eval.jsonl"))), tok, None, 0, 1, 128, show=False)
    seq = 40
    packed = Packed(stream, seq, 1, 0, 1, shuffle=False)
    for k in range(packed.n):
        w = packed.window(k)
        s = slice(k * (seq + 1), (k + 1) * (seq + 1))
        ids, target, doc = ref_ids[s], ref_target[s], ref_doc[s]
        expect = [ids[t + 1] if target[t + 1] and doc[t + 1] == doc[t] else -100 for t in range(seq)]
        assert w["input_ids"].tolist() == ids[:-1] and w["shift_labels"].tolist() == expect, k


def test_prompt_completion_text_and_pretokenized(tok):
    eos = tok.eos_token_id
    p, c = tok("What is 2 + 2?", add_special_tokens=False)["input_ids"], tok(" 4", add_special_tokens=False)["input_ids"]
    ids, mask = to_example({"prompt": "What is 2 + 2?", "completion": " 4"}, tok, None)
    assert ids == p + c + [eos] and mask == [False] * len(p) + [True] * (len(c) + 1)
    ids, mask = to_example({"text": "abc"}, tok, None)
    assert ids == tok("abc", add_special_tokens=False)["input_ids"] + [eos] and all(mask)
    ids, mask = to_example({"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, None, None)
    assert ids == [5, 6, 7] and mask == [False, True, True]
    ids, _ = to_example({"body": "abc"}, tok, "body")
    assert ids == tok("abc", add_special_tokens=False)["input_ids"] + [eos]
    with pytest.raises(TrainError, match="no chat template"):
        chat_example([{"role": "user", "content": "x"}], type("T", (), {"chat_template": None})())


def test_every_file_format_gives_the_same_stream(tok, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = ["the first line", "a second one", "and a third"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n\n")
    pq.write_table(pa.table({"text": lines}), tmp_path / "a.parquet")
    datasets.Dataset.from_dict({"text": lines}).save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"body": lines})}).save_to_disk(str(tmp_path / "hfdict"))
    expect = [t for line in lines for t in tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    cases = [("a.jsonl", "train", None), ("a.txt", "train", None), ("a.parquet", "train", None), ("hf", "train", None), ("hfdict", "validation", "body")]
    for name, split, field in cases:
        src = resolve(str(tmp_path / name))
        stream = tokenize(records(src, split), tok, field, 0, 1, 128, show=False)
        assert stream.tokens.tolist() == expect, name
        assert stream.doc.unique().numel() == 3 and stream.mask.all()
    with pytest.raises(TrainError, match="no split 'train'"):
        list(records(resolve(str(tmp_path / "hfdict")), "train"))
    assert resolve("some-org/some-dataset").kind == "hf_hub"


def _dataset_folder(root: Path) -> list[dict]:
    """A local dataset folder as on the hub: data/train-*.jsonl (two files) and data/test.jsonl, chat records."""
    recs = [json.loads(line) for line in (CHAT / "chat.jsonl").read_text().splitlines()[:30]]
    (root / "data").mkdir(parents=True)
    (root / "data" / "train-00000-of-00002.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:17]))
    (root / "data" / "train-00001-of-00002.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[17:]))
    (root / "data" / "test-00000-of-00001.jsonl").write_text(json.dumps(recs[0]) + "\n")
    return recs


def test_local_dataset_folder_with_and_without_streaming(tok, tmp_path, monkeypatch, capsys):
    """`--data FOLDER` (hub layout) goes through `datasets.load_dataset(FOLDER, split, streaming)`: downloaded-style and
    streamed it gives the records of its files in order, the same stream as the JSONL itself; `--data-split` picks
    the split; an unknown split is one line; the trainer runs on it with --data-streaming."""
    import datasets

    from automodel_convert.train import main

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    recs = _dataset_folder(tmp_path / "ds")
    src = resolve(str(tmp_path / "ds"))
    assert src.kind == "hf_folder"
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ref = tokenize(records(resolve(str(tmp_path / "all.jsonl"))), tok, None, 0, 1, 128, show=False)
    for streaming in (False, True):
        assert [r["messages"] for r in records(src, "train", streaming)] == [r["messages"] for r in recs]
        stream = tokenize(records(src, "train", streaming), tok, None, 0, 1, 128, show=False)
        assert torch.equal(stream.tokens, ref.tokens) and torch.equal(stream.mask, ref.mask) and torch.equal(stream.doc, ref.doc)
        assert [r["messages"] for r in records(src, "test", streaming)] == [recs[0]["messages"]]
    with pytest.raises(TrainError, match="cannot load the dataset"):
        list(records(src, "validation"))
    metrics = tmp_path / "m.jsonl"
    argv = ["--model", str(fixture_path("qwen3_moe")), "--tokenizer", str(CHAT), "--data", str(tmp_path / "ds"), "--data-streaming",
            "--seq", "32", "--steps", "2", "--dtype", "float32", "--device", "cpu", "--quiet", "--metrics", str(metrics)]
    assert main(argv) == 0, capsys.readouterr().err
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]


def test_packing_restarts_positions_and_never_crosses_documents():
    # two documents of 4 and 5 tokens, the second with a prompt (untrained) token
    tokens = torch.tensor([10, 11, 12, 13, 20, 21, 22, 23, 24])
    mask = torch.tensor([True, True, True, True, False, True, True, True, True])
    doc = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    w = window_fields(tokens, mask, doc)
    assert w["input_ids"].tolist() == [10, 11, 12, 13, 20, 21, 22, 23]
    assert w["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    # 13 -> 20 crosses the boundary; 20 -> 21 is trained (21 is a target token); no target is the untrained 20
    assert w["shift_labels"].tolist() == [11, 12, 13, -100, 21, 22, 23, 24]
    assert w["doc_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_packed_position_is_global_and_resumable():
    n, seq = 12, 3
    stream = Stream(torch.arange(n * (seq + 1)), torch.ones(n * (seq + 1), dtype=torch.bool), torch.zeros(n * (seq + 1), dtype=torch.long))
    one = Packed(stream, seq, 2, 0, 1, seed=3)
    ref = [one.next_batch()["input_ids"] for _ in range(4)]  # world 1, batch 2: windows 0..7 of the order
    two = [Packed(stream, seq, 1, r, 2, seed=3) for r in range(2)]  # world 2, batch 1: the same windows, split
    got = [torch.cat([p.next_batch()["input_ids"] for p in two]) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    resumed = Packed(stream, seq, 2, 0, 1, seed=3)
    resumed.load_state_dict({"position": 4})
    assert torch.equal(resumed.next_batch()["input_ids"], ref[2])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_document_masking_equals_each_document_alone(attn):
    from automodel_convert.models import AutoModelForCausalLM
    from automodel_convert.train.masking import DocumentMasking

    model = AutoModelForCausalLM.from_pretrained(fixture_path("qwen3_moe"), dtype=torch.float32, backend=f"attn={attn}", device="cpu")
    a, b = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(0)), torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(1))
    masking = DocumentMasking(model)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], dim=1)
        packed_ids = torch.cat([a, b], dim=1)
        pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
        docs = torch.tensor([[0] * 7 + [1] * 9])
        with masking.documents(docs):
            packed = model(input_ids=packed_ids, position_ids=pos).logits
        leaky = model(input_ids=packed_ids, position_ids=pos).logits  # plain causal: the second document sees the first
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(leaky[:, 7:], alone[:, 7:], atol=1e-3)


def _tokenize_worker(rank: int, world: int, path: str) -> dict:
    from transformers import AutoTokenizer

    init_gloo()
    tok = AutoTokenizer.from_pretrained(CHAT)
    s = tokenize(records(resolve(path)), tok, None, rank, world, 128, show=False)
    return {"tokens": s.tokens, "mask": s.mask, "doc": s.doc}


def test_tokenization_split_over_ranks_gives_every_rank_the_whole_stream(tok):
    path = str(CHAT / "eval.jsonl")
    ref = tokenize(records(resolve(path)), tok, None, 0, 1, 128, show=False)
    for res in run_ranks(_tokenize_worker, 2, path):
        assert torch.equal(res["tokens"], ref.tokens) and torch.equal(res["mask"], ref.mask) and torch.equal(res["doc"], ref.doc)


def _sharded_worker(rank: int, world: int, folder: str, names: list[str], seq: int, batch: int) -> dict:
    """Each source read through `sources.shard` (this rank's records only), tokenized, packed: 3 steps of batches, then
    a `Packed` resumed at global position `world * batch` (after one step) and its next batch."""
    from transformers import AutoTokenizer

    from automodel_convert.train import data as data_mod
    from automodel_convert.train.sources import shard

    init_gloo()
    tok = AutoTokenizer.from_pretrained(CHAT)
    seen: list[int] = []
    real = data_mod.to_example
    data_mod.to_example = lambda rec, *a: seen.append(1) or real(rec, *a)
    out = {}
    import datasets

    datasets.config.HF_DATASETS_CACHE = f"{folder}/cache"
    for name in names:
        seen.clear()
        src, streaming = resolve(f"{folder}/{name}"), name == "ds"
        own = [i for i, _ in shard(src, streaming=streaming, rank=rank, world=world)]
        stream = tokenize(shard(src, streaming=streaming, rank=rank, world=world), tok, None, rank, world, 128, show=False)
        packed = Packed(stream, seq, batch, rank, world, seed=5)
        steps = [packed.next_batch() for _ in range(3)]
        resumed = Packed(stream, seq, batch, rank, world, seed=5)
        resumed.load_state_dict({"position": world * batch})
        out[name] = {"own": own, "tokenized": len(seen), "steps": steps, "resumed": resumed.next_batch()}
    import torch.distributed as dist

    if rank == 0:
        (Path(folder) / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"nothing": 1}\n{"text": "c"}\n')
    dist.barrier()
    try:  # record 2 (rank 0's of 2) is not a record: both ranks must raise, the other must not hang in the exchange
        tokenize(shard(resolve(f"{folder}/bad.jsonl"), rank=rank, world=world), tok, None, rank, world, 128, show=False)
        out["error"] = None
    except TrainError as e:
        out["error"] = str(e)
    return out


def test_each_rank_reads_and_tokenizes_its_share_and_trains_on_the_1_rank_order(tmp_path):
    """2 ranks through tests/spawn_ranks.py against 1 rank: every rank converts only records i % 2 == rank (JSONL,
    parquet, a saved HF dataset, a dataset folder streamed), and the packed batches of the two ranks, side by side, are the 1-rank run's batches
    (world 2 x batch 2 = world 1 x batch 4 windows per step), also after a resume from the global position."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from automodel_convert.train.sources import shard

    recs = [json.loads(line) for line in (CHAT / "chat.jsonl").read_text().splitlines()[:61]]
    _dataset_folder(tmp_path / "ds")  # its own 30 records, streamed
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" + ("\n" if k % 7 == 3 else "") for k, r in enumerate(recs)))  # blank lines too
    table = pa.Table.from_pylist(recs)
    (tmp_path / "pq").mkdir()
    pq.write_table(table.slice(0, 25), tmp_path / "pq" / "a.parquet")
    pq.write_table(table.slice(25), tmp_path / "pq" / "b.parquet", row_group_size=10)
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "hf"))
    names, seq, world, batch = ["c.jsonl", "pq", "hf", "ds"], 48, 2, 2
    results = run_ranks(_sharded_worker, world, str(tmp_path), names, seq, batch)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(CHAT)
    datasets.config.HF_DATASETS_CACHE = str(tmp_path / "cache")
    for name in names:
        src, streaming = resolve(str(tmp_path / name)), name == "ds"
        every = [r for _, r in shard(src, streaming=streaming)]
        if name != "ds":
            assert every == recs, name  # one rank: every record, in file order
        ref = Packed(tokenize(records(src, streaming=streaming), tok, None, 0, 1, 128, show=False), seq, world * batch, 0, 1, seed=5)
        ref_steps = [ref.next_batch() for _ in range(3)]
        for r, res in enumerate(results):
            got = res[name]
            assert got["own"] == list(range(r, len(every), world)) and got["tokenized"] == len(got["own"]), name
        for k in range(3):
            for field in ("input_ids", "shift_labels", "position_ids", "doc_ids"):
                both = torch.cat([res[name]["steps"][k][field] for res in results])
                assert torch.equal(both, ref_steps[k][field]), (name, k, field)
        both = torch.cat([res[name]["resumed"]["input_ids"] for res in results])
        assert torch.equal(both, ref_steps[1]["input_ids"]), name
    assert results[0]["error"] == results[1]["error"] and "expected text, messages" in results[0]["error"]
