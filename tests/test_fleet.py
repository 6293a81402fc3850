"""`edgefm-fleet run` with tiny models and 3 agents against a real Mosquitto; profiles."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_fleet_run_three_agents_real_broker_with_chaos(tmp_path, broker):
    out = tmp_path / "fleet"
    (out / "coordinator").mkdir(parents=True)
    (out / "coordinator" / "coordinator.sqlite").write_bytes(b"state of an earlier run")   # a run starts fresh
    r = subprocess.run([sys.executable, "-m", "devices.cli", "run", "--devices", "3", "--rounds", "3", "--model", "tiny",
                        "--broker", broker.url, "--out", str(out), "--chaos", "--timeout", "400"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "removed the previous run's state" in r.stdout + r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["rounds_completed"] == 3 and rep["final_version"] == 3
    assert set(rep["devices"]) == {"dev-0", "dev-1", "dev-2"}
    for name, d in rep["devices"].items():
        assert d["global_version"] == 3, (name, d)                 # every agent on the final global version
        assert d["updates_queued"] == 0 and d["updates_counted"] == 3
        assert d["updates_awaiting_receipt"] == 0 and d["updates_receipted"] >= 3  # the coordinator confirmed each
        assert d["updates_recorded"] >= d["updates_acknowledged"]  # nothing acknowledged was lost
    assert rep["devices"]["dev-0"]["restarts"] == 1 and rep["nothing_lost"] is True
    assert [x["version"] for x in rep["rounds"]] == [0, 1, 2, 3]
    first, last = rep["rounds"][0]["heldout_mean"], rep["rounds"][-1]["heldout_mean"]
    assert last < first                                            # the fleet learned
    assert rep["inference_latency_ms"]["answered"] >= 1
    html = (out / "report.html").read_text()
    assert "<svg" in html and "dev-2" in html


def test_profiles_load_and_refuse_a_bundle_that_does_not_fit(tmp_path_factory, tiny_llama_dir):
    from devices.profiles import list_profiles, load_profile
    from edge_runtime.errors import BundleError, ConfigError
    from helpers import tiny_bundle
    assert {"tiny", "rpi4", "rpi5", "jetson-orin-nano", "x86-gateway"} <= set(list_profiles())
    for n in list_profiles():
        p = load_profile(n)
        assert p.export["quant"] in ("fp32", "int8", "int4", "nf4") and p.training["backend"] in ("onnx", "torch")
    assert load_profile("auto").name in list_profiles()
    with pytest.raises(ConfigError, match="available"):
        load_profile("toaster")
    b = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")
    assert load_profile("tiny").check_bundle_fits(b)["estimated_bytes"] > 0
    small = load_profile("tiny")
    small.ram_mb, small.memory_budget_fraction = 256, 0.25
    with pytest.raises(BundleError, match="MB"):
        small.check_bundle_fits(b)


def _chromium():
    import shutil
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.fail("Debian's chromium is needed to check the report page (scripts/test.sh installs it)")
    return exe


def test_fleet_run_on_user_data_and_report_reads_in_a_browser(tmp_path, broker):
    # Prepare: a user's own data, one JSONL file and one folder of text files, one device each
    data = tmp_path / "data"
    (data / "garage").mkdir(parents=True)
    (data / "kitchen.jsonl").write_text("".join(json.dumps({"text": f"the oven in kitchen {i} reached {150 + i} degrees"}) + "\n"
                                                for i in range(30)))
    (data / "garage" / "notes.txt").write_text("\n\n".join(f"the door of garage {i} was opened at {i % 12} o'clock" for i in range(30)))
    out = tmp_path / "fleet"
    # Execute
    r = subprocess.run([sys.executable, "-m", "devices.cli", "run", "--data", str(data), "--rounds", "2", "--model", "tiny",
                        "--broker", broker.url, "--out", str(out), "--timeout", "400"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # Assert: one device per entry, the held-back data written out, the split reported
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["devices"]) == {"garage", "kitchen"} and rep["rounds_completed"] == 2
    for name in ("garage", "kitchen"):
        evalset = (out / "heldout" / f"{name}.eval.jsonl").read_text().splitlines()
        gateset = (out / "heldout" / f"{name}.gate.jsonl").read_text().splitlines()
        intake = rep["devices"][name]["intake"]
        assert len(evalset) == 3 and intake["added"] == 27                # 10% held back by the simulator
        assert intake["train"] + intake["heldout"] == 27 and len(gateset) == intake["heldout"]
        assert rep["devices"][name]["gate_decisions"], "the gate's decisions are in the report"
    # the page, rendered by a real browser: the summary opens it, the charts are drawn
    page = out / "report.html"
    dom = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert dom.index('id="summary"') < dom.index('id="charts"')
    assert "The fleet learned" in dom or "The fleet did not learn" in dom
    assert "garage" in dom and "Gate decisions per device" in dom
    assert dom.count("<svg") >= 3
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1300,2000",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000                                  # a drawn page, not a blank one
