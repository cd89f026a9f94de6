"""The cluster's configuration (bridge/config.py) and the single-process default: no Redis, no asyncpg."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bridge.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_mistakes_are_named_by_key_without_the_url(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cluster:\n  redis_url: http://user:hunter2@cache:6379\n  heartbeat_s: 3\n  node_timeout_s: 4\n"
                   "  node_id: 'bad id'\nstore:\n  postgres_url: mysql://u:pw@db/x\ngateway: {demo: true}\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    text = str(err.value)
    assert "cluster.redis_url must start with redis://" in text
    assert "store.postgres_url must start with postgresql://" in text
    assert "node_id" in text
    assert "hunter2" not in text and "pw@db" not in text


def test_node_timeout_must_outlast_two_heartbeats(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cluster:\n  redis_url: redis://127.0.0.1:6379/0\n  heartbeat_s: 3\n  node_timeout_s: 5\n"
                   "gateway: {demo: true}\n")
    with pytest.raises(ConfigError, match=r"node_timeout_s \(5\) must be at least twice cluster.heartbeat_s"):
        load_config(cfg)


def test_a_single_process_imports_neither_redis_nor_asyncpg():
    code = ("import sys, asyncio\n"
            "from bridge.app import Bridge\n"
            "from bridge.config import Config\n"
            "async def main():\n"
            "    b = Bridge(Config.model_validate({'audiosocket': {'listen': '127.0.0.1:0'}, 'gateway': {'demo': True},"
            " 'api': {'enabled': True, 'listen': '127.0.0.1:0'}}))\n"
            "    async with b:\n"
            "        assert b.cluster is None\n"
            "asyncio.run(main())\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('redis', 'asyncpg')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
