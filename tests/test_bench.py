"""The benchmarks run and say what they measured (on tiny sizes here: their timings are not tested)."""

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run(script: str, *args: str, out: Path, name: str | None = None) -> str:
    """The table the script wrote: name.md (default: the script's name)."""
    subprocess.run([sys.executable, script, *args, "--out", str(out)], cwd=BENCH, check=True, timeout=600,
                   capture_output=True, text=True)
    return (out / f"{name or Path(script).stem}.md").read_text()


def table(text: str) -> list[list[str]]:
    """The rows of the Markdown table in `text`, without its header."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_step_bench_times_every_variant_and_they_agree(tmp_path):
    text = run("step.py", "--model", "tiny-llama", "--cuts", "2", "4", "--sizes", "2x8", "--warmup", "1",
               "--reps", "2", out=tmp_path)
    rows = table(text)
    assert [r[1] for r in rows] == ["unsplit", "detach", "full", "full, stateless fallback",
                                    "unsplit, LoRA on every block", "full+trunk"]
    assert len({r[-1] for r in rows}) == 1, "the first step's loss differs between variants"
    assert all(float(r[2]) > 0 for r in rows)
    assert re.search(r"The fallback server recomputed [1-9]\d* forwards; the stateful one 0", text)


def test_classroom_bench_trains_each_class_and_client_0_is_the_same_in_each(tmp_path):
    rows = table(run("classroom.py", "--model", "tiny-llama", "--cuts", "2", "4", "--clients", "1", "3", "--steps",
                     "2", out=tmp_path))
    assert [(r[0], r[1]) for r in rows] == [("full", "1"), ("full", "3"), ("full+trunk", "1"), ("full+trunk", "3")]
    assert all(float(r[2]) > 0 and float(r[4]) <= float(r[5]) for r in rows)
    assert [r[7] for r in rows] == ["yes"] * 4


def test_wire_bench_compares_with_pickle_and_bare_bytes(tmp_path):
    rows = table(run("wire.py", "--shapes", "2x8x64", "--rounds", "2", out=tmp_path))
    assert rows[0][0] == "2×8×64" and all(float(x) > 0 for x in rows[0][2:5])


def test_compression_bench_reports_each_wire_dtype(tmp_path):
    rows = table(run("compression.py", "--model", "tiny-llama", "--cuts", "2", "4", "--size", "2x8", "--warmup", "1",
                     "--reps", "1", "--steps", "10", out=tmp_path))
    assert [r[0] for r in rows] == ["float32", "float16", "bfloat16", "blockwise8"]
    assert rows[0][2] == "1.00" and float(rows[1][2]) < 0.6 and float(rows[2][2]) < 0.6  # bytes vs float32
    assert float(rows[3][2]) < 0.35  # 8-bit tensors, the headers around them a larger share at this tiny size
    assert float(rows[0][5]) == 0 and 0 < float(rows[1][5]) < 1e-2 and 0 < float(rows[3][5]) < 1e-1  # gradients


def test_generation_bench_compares_four_ways_that_make_the_same_tokens(tmp_path):
    text = run("generation.py", "--model", "tiny-llama", "--cuts", "2", "4", "--batches", "2", "--new-tokens", "4",
               "--warmup", "0", "--reps", "1", out=tmp_path)
    rows = table(text)
    assert [r[3] for r in rows] == ["plain unsplit, cached", "unsplit with LoRA layers, cached", "split, cached",
                                    "split, uncached"]
    assert [r[0] for r in rows] == ["bare"] * 4 and all(float(r[4]) > 0 for r in rows)  # tiny-llama: no chat template
    assert rows[0][7] == "1.00×" and rows[2][7].endswith(("✓", "✗"))  # each way against the plain model
    assert rows[0][6] == "+0.0" and float(rows[3][6]) > 0  # ms a step over the plain model: the uncached pays
    assert "bare B = 2: yes" in text  # each way made the plain unsplit model's tokens


def test_notebook_bench_times_a_notebook(tmp_path):
    import nbformat

    notebook = tmp_path / "tiny.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("assert 1 + 1 == 2")]), notebook)
    text = run("notebooks.py", str(notebook), out=tmp_path)
    assert "| tiny.ipynb |" in text and "1 passed" in text


def test_network_bench_measures_each_rate_or_says_why_not(tmp_path):
    text = run("network.py", "--model", "tiny-llama", "--cuts", "2", "4", "--size", "2x8", "--rates", "50",
               "--warmup", "1", "--reps", "1", out=tmp_path)
    rows = table(text)
    if "no network namespace could be made" in text:  # not root, or no `ip`/`tc`: loopback only, and it says so
        assert [r[0] for r in rows] == ["loopback", "MB on the wire per step"]
    else:
        assert [r[0] for r in rows] == ["loopback", "50 Mbit/s", "MB on the wire per step"]
    assert "(1.00×)" in rows[0][2]  # loopback float32 is the reference
    assert float(rows[-1][3]) < 0.6 * float(rows[-1][2])  # float16 halves the tensors' bytes


def test_privacy_bench_measures_each_defence_against_the_strongest_of_its_attacks(tmp_path):
    text = run("privacy.py", "--model", "tiny-llama", "--cuts", "2", "4", "--depths", "1", "--steps", "2",
               "--seeds", "2", "--sentences", "2", "--fit-tokens", "512", "--fit-steps", "5", "--repeats", "12",
               "--overhead-reps", "2", "--snrs", "16", "0.25", "--only", "none", "cut depth", "h1 clip + noise",
               "NoPeek",
               "--sweep-cuts", "1", "3",
               out=tmp_path)
    header = [c.strip() for c in next(line for line in text.splitlines() if line.startswith("|")).strip("|").split("|")]
    rows = {(r[0], r[1]): dict(zip(header, r, strict=True)) for r in table(text)}
    assert set(rows) == {("none", "-"), ("cut depth", "a = 1"),
                         *(("h1 clip + noise", f"SNR {s}") for s in ("16", "0.25")),
                         *(("NoPeek", f"λ = {lam}") for lam in ("10", "100"))}
    pct = lambda cell: float(cell.strip("*").split("%")[0]) / 100  # noqa: E731
    assert all(r["runs"] == "2" for r in rows.values())  # every row, noise or not
    assert pct(rows[("none", "-")]["read: public"]) == 1.0  # the white-box search reads the tiny sentences whole
    noisiest = rows[("h1 clip + noise", "SNR 0.25")]
    # twelve sends at SNR 0.25 are one at SNR 3: the likelihood reads far more than the search of one send
    assert pct(noisiest["read: ML, 12 sends"]) >= pct(noisiest["read: public"]) + 0.3
    assert noisiest["read: strongest"].endswith("(ML, 12 sends)")
    assert all(r["read: shadow"] for k, r in rows.items() if k[0] == "NoPeek")  # the shadow Bottom, against NoPeek only
    assert not rows[("none", "-")]["read: shadow"] and not rows[("none", "-")]["read: ML, 12 sends"]
    assert rows[("none", "-")]["read: tracked"] and not rows[("cut depth", "a = 1")]["read: tracked"]
    for r in rows.values():  # the strongest is the highest median of the row's attacks
        reads = [pct(v) for k, v in r.items() if k.startswith("read: ") and k != "read: strongest" and v]
        assert pct(r["read: strongest"]) == max(reads)
        assert "→" in r["natural text loss"]
    assert any(r["Pareto"] == "yes" for r in rows.values())
    assert all(int(r["seconds"]) > 0 for r in rows.values())  # what each row cost, training and attacks
    assert (tmp_path / "privacy.png").stat().st_size > 10_000
    overhead = table((tmp_path / "privacy-overhead.md").read_text())
    assert [r[0] for r in overhead][0] == "none" and len(overhead) == 5 and overhead[0][3] == "1.00×"
    sweep = table((tmp_path / "privacy-cuts.md").read_text())
    assert [r[0] for r in sweep] == ["1", "3"] and all(r[1] == "100%" and r[2] == "2/2" for r in sweep)


def test_federated_bench_tunes_and_reports_on_disjoint_seeds_with_each_rate_inside_its_grid(tmp_path):
    import json

    text = run("federated.py", "--model", "tiny-llama", "--cuts", "2", "4", "--tune-seeds", "0", "--report-seeds", "1",
               "--arms", "FedAvg", "alone", out=tmp_path)
    got = json.loads((tmp_path / "federated.json").read_text())
    assert got["tune_seeds"] == [0] and got["report_seeds"] == [1]
    assert set(got["chosen"]) == {"FedAvg", "alone", "FedAvgM"}
    for arm, lr in got["chosen"].items():  # inside its grid, or the grid grew twice past its ends (4 + 2 rates)
        grid = got["grids"][arm]
        assert lr in grid and (grid[0] < lr < grid[-1] or (arm != "FedAvgM" and len(grid) == 6)), (arm, lr, grid)
    reported = got["reported"]["1"]
    assert set(reported["arms"]) == {"FedAvg", "alone", "FedAvgM", "FedAvg, Adam kept, FedAvg's rate"}
    assert all(len(a["curve"]) == 6 and 0 <= a["exact"] <= 8 and 0 <= a["rephrased"] <= 16
               for a in reported["arms"].values())
    assert len(reported["arms"]["FedAvg"]["drift"]) == 6 and not reported["arms"]["alone"]["drift"]
    leaks = reported["leaks"]
    assert set(leaks["matched"]) == {"0", "1", "2", "3"} and all(m["of"] == 2 for m in leaks["matched"].values())
    assert [r[0] for r in table(text.split("\n\n")[2])] == ["FedAvg", "alone", "FedAvgM",
                                                             "FedAvg, Adam kept, FedAvg's rate"]  # the first table
    refused = subprocess.run([sys.executable, "federated.py", "--tune-seeds", "0", "1", "--report-seeds", "1"],
                             cwd=BENCH, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "disjoint" in refused.stderr


def test_quiet_bench_reads_exactly_through_a_server_that_answers_zeros_and_the_audit_catches_it(tmp_path):
    text = run("quiet.py", "--model", "tiny-llama", "--cuts", "2", "4", "--steps", "4", "--seeds", "2", "--scales",
               "1", "0", "-1", "--sentences", "2", "--budget", "32", "--fit-tokens", "256", "--share", "0.75",
               out=tmp_path, name="privacy-quiet")
    honest, silent, negated = table(text)
    assert [honest[0], silent[0], negated[0]] == ["honest", "quiet(0)", "negated (×−1)"]
    assert silent[1] == "0" and silent[3] == "100%" and honest[3] == "0%"  # its Bottom public: read exactly
    flagged = lambda cell: re.fullmatch(r"([1-9]\d*) of \1", cell)  # noqa: E731  every audited step (of 8 drawn at 3/4)
    assert silent[6] == "100%" and flagged(silent[7]) and silent[8] == "1, 1"  # the ratio check: every step
    assert negated[6] == "0%" and flagged(negated[7]) and negated[8] == "never, never"  # the norm kept: audit only
    assert honest[6] == "0%" and re.fullmatch(r"0 of \d+", honest[7]) and honest[8:] == ["never, never"] * 2


def test_trunk_knows_bench_asks_the_public_model_the_servers_trunk_lora_and_the_clients_whole(tmp_path):
    text = run("trunk_knows.py", "--model", "tiny-llama", "--cuts", "2", "4", "--steps", "4", "--seeds", "2",
               out=tmp_path, name="privacy-trunk")
    rows = table(text)
    assert [r[0] for r in rows] == ["public model", "public Bottom and Top, the server's Trunk LoRA",
                                    "the client's whole model"]
    loss = [float(r[2].split()[0]) for r in rows]
    assert loss[0] > loss[1] > loss[2]  # the server's adapter learned part of what the client's whole model did


def test_capacity_bench_serves_each_class_serially_and_together_with_and_without_batching(tmp_path):
    rows = table(run("capacity.py", "--model", "tiny-llama", "--cuts", "2", "4", "--classes", "1", "3", "--new", "4",
                     "--steps", "1", out=tmp_path))
    works = ("generation", "training", "training full+trunk")
    assert [(r[0], r[1], r[2]) for r in rows] == [(work, batching, n) for batching in ("off", "2 ms")
                                                 for work in works for n in ("1", "3")]
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows)
