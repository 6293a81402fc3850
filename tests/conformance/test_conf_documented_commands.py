"""Every command README.md and docs/ show is run by a test, as written (local paths, ports and brokers
substituted). A command added to the docs without a test here fails ``test_every_documented_command_is_run``."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from documented import MINILM_BUILD, ROOT, SMOLLM2_BUILD, argv, documented_commands
from helpers import free_port, tiny_bundle, wait_for

pytestmark = pytest.mark.slow
pytest.importorskip("torch")

# Commands run elsewhere, and why not here.
ELSEWHERE = {
    "bash scripts/test.sh": "the README's test command: CI runs it (.ci/run)",
    "bash scripts/demo.sh": "the README's demo command (real SmolLM2, 4 agents, minutes): run by hand before a release; "
                            "its fleet path is tests/test_fleet.py with the tiny model",
    "edgefm-fleet demo": "what scripts/demo.sh runs (see above)",
    "edgefm-fleet run --devices 3 --rounds 3 --model tiny --chaos --out fleet-out":
        "tests/test_fleet.py::test_fleet_run_three_agents_real_broker_with_chaos (same flags plus a test broker)",
    "edgefm-fleet run --data my-data/ --model smollm2 --rounds 3":
        "tests/test_fleet.py::test_fleet_run_on_user_data_and_report_reads_in_a_browser (tiny model); "
        "bench/learning.py drives the same agents on SmolLM2",
    SMOLLM2_BUILD: "the smollm2_bundle fixture (conftest.py) builds README's bundle with it",
    MINILM_BUILD: "the minilm_bundles fixture (conftest.py)",
}
RUN_HERE = {
    "edgefm-export build ./my-hf-checkpoint -o out --profile rpi5",
    "edgefm-export verify bundles/smollm2-int4 --source smollm2",
    "edgefm-export adapter to-peft adapter.safetensors --bundle B -o peft/",
    "edgefm-export adapter from-peft peft/ --bundle B -o adapter.safetensors",
    "edgefm-export adapter to-onnx-adapter adapter.safetensors --bundle B -o a.onnx_adapter",
    "edgefm-agent run --bundle bundles/smollm2-int4 --config fleet-keys/devices/pi-1/agent.toml --profile rpi5",
    "curl localhost:8080/v1/chat/completions -d '{\"messages\":[{\"role\":\"user\",\"content\":\"hello\"}],\"stream\":true}'",
    "curl localhost:8080/v1/examples -d '{\"examples\":[{\"text\":\"...\"},{\"prompt\":\"Q: ...\",\"completion\":\" A: ...\"}]}'",
    "edgefm-agent status | adapters | rollback [--to ID] | train-now",
    "edgefm-agent adapters load peft-dir/ --name support-v2",
    "edgefm-coordinator serve --bundle bundles/smollm2-int4",
    "edgefm-coordinator serve --bundle B --config fleet-keys/coordinator/coordinator.toml --mode async --strategy svd",
    "edgefm-coordinator status | devices | rounds | adapters [--json]",
    "edgefm-coordinator rollback --to 3 --broker URL --bundle B",
    "edgefm-coordinator export --format peft --bundle B -o peft-global/",
    "edgefm-fleet profiles",
    "edgefm-coordinator provision --fleet plant --devices pi-1 pi-2 pi-3 --broker-host broker.lan -o fleet-keys/",
}


def test_every_documented_command_is_run():
    docs = set(documented_commands())
    assert docs == set(ELSEWHERE) | RUN_HERE, (f"documented but not run: {sorted(docs - set(ELSEWHERE) - RUN_HERE)}; "
                                              f"run but no longer documented: {sorted((set(ELSEWHERE) | RUN_HERE) - docs)}")


def alternatives(line: str) -> list[str]:
    """'edgefm-agent status | adapters | rollback [--to ID]' -> one command per alternative ([...] dropped)."""
    prog, rest = line.split(" ", 1)
    words = [a.strip() for a in rest.split("|")]
    return [f"{prog} {w.split('[')[0].strip()}" for w in words] + [f"{prog} {w.replace('[', '').replace(']', '')}"
                                                                     for w in words if "[" in w]


def run(args: list[str], cwd: Path, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    import os
    # PYTHONPATH: the checkout under test, also from another working directory
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_export_commands(tmp_path, tiny_llama_dir, smollm2_bundle):
    ckpt = tmp_path / "my-hf-checkpoint"
    shutil.copytree(tiny_llama_dir, ckpt)
    r = run(argv("edgefm-export build ./my-hf-checkpoint -o out --profile rpi5"), tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    b = tmp_path / "out"
    m = json.loads((b / "manifest.json").read_text())
    assert m["training"]["batch"] == 8 and m["quant"]["scheme"] == "int4"   # the rpi5 profile's export settings
    r = run(argv("edgefm-export verify bundles/smollm2-int4 --source smollm2", {"bundles/smollm2-int4": str(smollm2_bundle)}),
            tmp_path, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    shutil.copy(b / "adapter.safetensors", tmp_path / "adapter.safetensors")
    for line in ("edgefm-export adapter to-peft adapter.safetensors --bundle B -o peft/",
                 "edgefm-export adapter from-peft peft/ --bundle B -o adapter.safetensors",
                 "edgefm-export adapter to-onnx-adapter adapter.safetensors --bundle B -o a.onnx_adapter"):
        r = run(argv(line, {"--bundle B": f"--bundle {b}"}), tmp_path)
        assert r.returncode == 0, (line, r.stderr[-2000:])
    assert (tmp_path / "peft" / "adapter_config.json").is_file() and (tmp_path / "a.onnx_adapter").is_file()


def test_agent_commands_on_the_real_model(tmp_path, broker, smollm2_bundle):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    line = "edgefm-agent run --bundle bundles/smollm2-int4 --config fleet-keys/devices/pi-1/agent.toml --profile rpi5"
    import os
    # short sessions (the rpi5 profile's 16 steps of 8 x 128 tokens take minutes on a CI runner)
    (tmp_path / "fast.toml").write_text("steps_per_round = 1\nmax_steps_per_session = 1\ngeneral_replay_fraction = 0.0\n")
    # (the provisioned agent.toml's broker and identity, here a loopback test broker)
    p = subprocess.Popen(argv(line, {"bundles/smollm2-int4": str(smollm2_bundle),
                                     "--config fleet-keys/devices/pi-1/agent.toml": f"--broker {broker.url} --device-id pi-1",
                                     "--profile rpi5": f"--profile rpi5 --port {port} --config fast.toml"}),
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        def up():
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2):
                    return True
            except OSError:
                return p.poll() is not None
        wait_for(up, 180, what="the agent's API")
        assert p.poll() is None, p.stdout.read()
        chat, examples = sorted(c for c in RUN_HERE if c.startswith("curl"))
        r = run(argv(chat, {"localhost:8080": f"127.0.0.1:{port}"}), tmp_path)
        events = [json.loads(x[6:]) for x in r.stdout.splitlines() if x.startswith("data: {")]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        assert r.returncode == 0 and r.stdout.rstrip().endswith("data: [DONE]") and text.strip(), r.stdout[-2000:]
        r = run(argv(examples, {"localhost:8080": f"127.0.0.1:{port}"}), tmp_path)
        assert r.returncode == 0 and json.loads(r.stdout)["added"] == 2, r.stdout
        for cmd in alternatives("edgefm-agent status | adapters | rollback [--to ID] | train-now"):
            cmd = cmd.replace("--to ID", "--to bundle")
            r = run(argv(cmd) + ["--url", url], tmp_path)
            if cmd.endswith("rollback"):   # nothing earlier to go back to yet: a clear error, exit 1
                assert r.returncode == 1 and "no earlier adapter" in r.stderr, (cmd, r.stderr)
            else:
                assert r.returncode == 0, (cmd, r.stderr[-2000:])
        # a PEFT directory made from this bundle's adapter: loaded, judged, served or kept
        peft_dir = tmp_path / "peft-dir"
        assert run(argv("edgefm-export adapter to-peft adapter.safetensors --bundle B -o peft/",
                        {"adapter.safetensors": str(smollm2_bundle / "adapter.safetensors"),
                         "--bundle B": f"--bundle {smollm2_bundle}", "peft/": str(peft_dir)}), tmp_path).returncode == 0
        r = run(argv("edgefm-agent adapters load peft-dir/ --name support-v2") + ["--url", url], tmp_path)
        assert r.returncode in (0, 3) and json.loads(r.stdout)["id"] == "loaded-support-v2", r.stderr[-2000:]
    finally:
        p.terminate()
        p.wait(60)


def test_coordinator_commands(tmp_path, broker_tls, smollm2_bundle, tiny_llama_dir, tmp_path_factory):
    import os
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # 1. the embedded-broker form on the real bundle: it starts, says where it listens, stops cleanly
    p = subprocess.Popen(argv("edgefm-coordinator serve --bundle bundles/smollm2-int4",
                              {"bundles/smollm2-int4": str(smollm2_bundle)}), cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not any("edgefm-coordinator: fleet" in x for x in lines):
            lines.append(p.stdout.readline())
        assert any("embedded broker on mqtt://127.0.0.1:" in x for x in lines), lines
    finally:
        p.terminate()
        assert p.wait(60) == 0
    shutil.rmtree(tmp_path / "edgefm-coordinator")
    # 2. TLS broker, async FedBuff with svd; a device update makes v1; then the admin commands
    b = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")
    tls = f"mqtts://localhost:{broker_tls.port}?ca={broker_tls.certs['ca.crt']}"
    (tmp_path / "coordinator.toml").write_text("buffer_size = 1\n")
    serve = argv("edgefm-coordinator serve --bundle B --config fleet-keys/coordinator/coordinator.toml --mode async --strategy svd",
                 {"--bundle B": f"--bundle {b}", "--config fleet-keys/coordinator/coordinator.toml":
                  f"--broker {tls} --config coordinator.toml"})
    p = subprocess.Popen(serve, cwd=tmp_path, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=env)
    from edge_runtime.agent import Agent
    from edge_runtime.config import AgentConfig
    from helpers import examples
    a = Agent(AgentConfig(bundle=str(b), data_dir=str(tmp_path / "dev"), broker=tls, fleet="default", device_id="d1",
                          auto_train=False, min_new_examples=1, steps_per_round=2))
    try:
        a.api.add_examples(examples(12))
        a.start()
        wait_for(lambda: a.sync.connected, 30, what="the device on TLS")
        time.sleep(1.0)
        a.train_once(forced=True)
        wait_for(lambda: a.global_version >= 1, 60, what="v1 from the coordinator over TLS")
        for cmd in alternatives("edgefm-coordinator status | devices | rounds | adapters [--json]"):
            r = run(argv(cmd), tmp_path)
            assert r.returncode == 0, (cmd, r.stderr[-2000:])
            if cmd.endswith("--json"):
                assert [v["version"] for v in json.loads(r.stdout)][-1] == 0
        r = run(argv("edgefm-coordinator rollback --to 3 --broker URL --bundle B",
                     {"--to 3": "--to 0", "URL": tls, "--bundle B": f"--bundle {b}"}), tmp_path)
        assert r.returncode == 0 and "rollback to v0" in r.stdout, r.stderr[-2000:]
        r = run(argv("edgefm-coordinator export --format peft --bundle B -o peft-global/", {"--bundle B": f"--bundle {b}"}),
                tmp_path)
        assert r.returncode == 0 and (tmp_path / "peft-global" / "adapter_config.json").is_file(), r.stderr[-2000:]
    finally:
        a.stop()
        p.terminate()
        p.wait(60)


def test_fleet_profiles(tmp_path):
    r = run(argv("edgefm-fleet profiles"), tmp_path)
    assert r.returncode == 0 and "rpi5" in r.stdout


def test_provision_command(tmp_path):
    r = run(argv("edgefm-coordinator provision --fleet plant --devices pi-1 pi-2 pi-3 --broker-host broker.lan -o fleet-keys/"),
            tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "fleet-keys"
    assert sorted(json.loads((out / "fleet.json").read_text())["devices"]) == ["pi-1", "pi-2", "pi-3"]
    assert (out / "broker" / "mosquitto.conf").is_file() and (out / "devices" / "pi-2" / "agent.toml").is_file()
    from cryptography import x509
    san = x509.load_pem_x509_certificate((out / "broker" / "server.crt").read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert "broker.lan" in san.get_values_for_type(x509.DNSName)
