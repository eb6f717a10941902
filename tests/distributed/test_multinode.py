"""Two nodes x one process, simulated on localhost with torchrun and a static rendezvous."""

import socket
import subprocess
import sys

from dist_helpers import ROOT, STEPS, fit_args, manifest, run_env, student


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_run_a_stage_to_the_end(ddp_run, tiny_assets, tmp_path):
    run, port = tmp_path / "run", _free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "mmkd", "--verbose", *fit_args(run, tiny_assets, 1, "ddp", "--trainer.num_nodes", "2")]
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    for proc, log in procs:
        codes.append(proc.wait(timeout=600))
        log.close()
    assert codes == [0, 0], (tmp_path / "node1.log").read_text()[-3000:] + (tmp_path / "node0.log").read_text()[-3000:]
    entry = manifest(run)["stages"]["distill"]
    assert entry["status"] == "done" and entry["global_step"] == STEPS
    # Lightning's own line (shown with --verbose): node 1 hosted global rank 1
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in (tmp_path / "node1.log").read_text()
    # node ranks took the same shards as two local processes: the same student
    ours, ref = student(run), student(ddp_run)
    worst = max(float((ours[k].float() - ref[k].float()).abs().max()) for k in ref)
    assert worst < 2e-5, worst
