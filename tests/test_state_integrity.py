"""Issue 15, faults: a corrupted or truncated state file is caught by its checksum; the server then
refuses to start, naming the file and the intact previous state beside it. It never serves garbage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from advgrpo.client import Group, RewardClient
from advgrpo.common.errors import ConfigError
from advgrpo.common.process import ServerProcess
from advgrpo.reward_server.state import CHECKSUM_KEY, StateStore

from .conftest import noise_image, smooth_image


def state(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    g = torch.Generator().manual_seed(seed)
    tensors = {"head.w": torch.randn(4, 3, generator=g), "optim.step": torch.tensor([seed], dtype=torch.int64),
               "half": torch.randn(5, generator=g).to(torch.bfloat16)}  # fmt: skip
    return tensors, {"version": str(seed), "fingerprint": "f"}


def flip_last_data_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last tensor's last byte: the file still parses
    path.write_bytes(bytes(data))


def test_a_saved_state_loads_back_exactly_with_its_checksum(tmp_path):
    store = StateStore(tmp_path)
    tensors, meta = state(1)
    store.save("dino", tensors, meta)
    loaded, loaded_meta = store.load("dino")
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert loaded_meta["version"] == "1" and len(loaded_meta[CHECKSUM_KEY]) == 64


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "edited version"])
def test_a_damaged_state_file_is_refused_and_the_previous_one_is_named(tmp_path, damage):
    store = StateStore(tmp_path)
    store.save("dino", *state(1))
    store.save("dino", *state(2))
    path, previous = store.path("dino"), store.previous_path("dino")
    if damage == "flipped byte":
        flip_last_data_byte(path)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-7])
    else:  # the header's JSON, same length: only the checksum can tell
        path.write_bytes(path.read_bytes().replace(b'"version":"2"', b'"version":"3"'))
    with pytest.raises(ConfigError) as info:
        store.load("dino")
    message = str(info.value)
    assert str(path) in message and "will not serve it" in message
    assert f"version 1, is intact in {previous}" in message, message
    expected = {"flipped byte": "does not match its checksum", "truncated": "unreadable state file",
                "edited version": "does not match its checksum"}  # fmt: skip
    assert expected[damage] in message


def test_a_state_file_from_before_checksums_loads_with_a_warning_and_gains_one(tmp_path, caplog):
    from safetensors.torch import save_file

    store = StateStore(tmp_path)
    save_file(state(1)[0], store.path("dino"), metadata=state(1)[1])  # an earlier release's file
    tensors, meta = store.load("dino")
    assert meta["version"] == "1" and CHECKSUM_KEY not in meta
    assert "without a checksum (written by an earlier release)" in caplog.text
    store.save("dino", tensors, {**meta, "version": "2"})
    assert len(store.load("dino")[1][CHECKSUM_KEY]) == 64


def test_the_previous_state_is_a_hard_link_of_what_was_replaced(tmp_path):
    store = StateStore(tmp_path)
    store.save("dino", *state(1))
    assert not store.previous_path("dino").exists()
    first = store.path("dino").read_bytes()
    store.save("dino", *state(2))
    assert store.previous_path("dino").read_bytes() == first
    assert store.read_verified(store.previous_path("dino"))[1]["version"] == "1"
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


@pytest.mark.slow
def test_the_server_refuses_a_corrupted_state_and_starts_from_the_previous_one_when_moved_back(tmp_path):
    state_dir = tmp_path / "state"
    rng = np.random.default_rng(0)
    refs, gens = [Group("r", [smooth_image(rng) for _ in range(4)])], [Group("g", [noise_image(rng) for _ in range(4)])]
    probe = [Group("p", [smooth_image(rng), noise_image(rng)])]
    args = ["--preset", "tiny", "--state-dir", str(state_dir)]
    with ServerProcess(args, http=False) as server, RewardClient(server.target, timeout_s=120) as client:
        client.update_discriminator("dino", refs, gens, steps=2)
        at_v1 = client.score(probe)[0].rewards
        client.update_discriminator("dino", refs, gens, steps=2)
    path = state_dir / "dino.safetensors"
    flip_last_data_byte(path)
    cmd = [sys.executable, "-m", "advgrpo.reward_server", *args, "--port", "0", "--no-http"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"{path}: state file does not match its checksum" in out.stderr and "Traceback" not in out.stderr
    previous = state_dir / "dino.prev.safetensors"
    assert f"version 1, is intact in {previous}" in out.stderr
    previous.replace(path)  # the operator goes back one update, knowingly
    with ServerProcess(args, http=False) as server, RewardClient(server.target, timeout_s=120) as client:
        assert {m.name: m.version for m in client.list_models()}["dino"] == 1
        assert client.score(probe)[0].rewards == at_v1


@pytest.mark.slow
def test_an_update_made_durable_but_unanswered_is_replayed_after_a_restart(tmp_path):
    """The case a SIGKILL between the state write and the answer leaves: the client never saw the
    answer and sends the update again, with its id, to the restarted server. It is replayed (same
    version, same result), not applied twice."""
    state_dir = tmp_path / "state"
    rng = np.random.default_rng(1)
    refs, gens = [Group("r", [smooth_image(rng) for _ in range(4)])], [Group("g", [noise_image(rng) for _ in range(4)])]
    args = ["--preset", "tiny", "--state-dir", str(state_dir)]
    with ServerProcess(args, http=False) as server, RewardClient(server.target, timeout_s=120) as client:
        first = client.update_discriminator("dino", refs, gens, steps=2, update_id="epoch-7")
        os.kill(server.pid, signal.SIGKILL)  # as if it died before its answer left
        server.proc.wait(30)
    with ServerProcess(args, http=False) as server, RewardClient(server.target, timeout_s=120) as client:
        again = client.update_discriminator("dino", refs, gens, steps=2, update_id="epoch-7")
        assert again.replayed and again.version == first.version == 1
        assert (again.loss, again.accuracy) == (first.loss, first.accuracy)
        assert {m.name: m.version for m in client.list_models()}["dino"] == 1
