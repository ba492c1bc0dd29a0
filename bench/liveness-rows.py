#!/usr/bin/env python3
"""Liveness row cost on SQLite: the wide `nodes` row (liveness columns beside the hardware and GPU
JSON, the schema before `node_liveness`) against the narrow `node_liveness` row, in one run.

Same settings as the fleet's SQLite registry (WAL, synchronous=FULL, one BEGIN IMMEDIATE
transaction per batch, one prepared `UPDATE ... WHERE id = ?` per node, as `Registry::record_seen`
does); 10,000 nodes, six batches each, alternating, the first of each discarded. Prints CPU and
wall microseconds per row. GPUS=N sets the GPUs in each node's inventory (default 8, about 3 KB
of JSON; the fleet_scale benchmark's nodes enroll with none). docs/fleet-scaling.md,
docs/benchmarks.md.

Usage: bench/liveness-rows.py        GPUS=0 bench/liveness-rows.py
"""
import sqlite3, json, time, os, tempfile, random
N=10000
gpu=lambda g:{"index":g,"uuid":f"GPU-00000000-{g}","name":"NVIDIA H100 80GB HBM3","serial":f"165000000{g}","pci_bus_id":f"00000000:{g+1:02x}:00.0","memory_total_bytes":85520809984,"power_limit_min_mw":200000,"power_limit_max_mw":700000,"power_limit_default_mw":700000,"max_pcie_gen":5,"max_pcie_width":16,"nvlink_count":18,"fan_count":0,"slowdown_temp_c":90,"shutdown_temp_c":95}
gpus=json.dumps([gpu(g) for g in range(int(os.environ.get("GPUS","8")))])
hw=json.dumps({"dmi_uuid":"4c4c4544-0000-4000-8000-000000000001","board_serial":"BENCH00000001","gpu_uuids":[f"GPU-00000000-{g}" for g in range(8)]})
desired=json.dumps({"generation":1,"drain":False,"power_budget_w":None,"labels":{"site":"lab","rack":"r1"},"update_channel":"stable","update_version":None})
hb=json.dumps({"seq":7,"at_ms":1,"state":"ready","health":{"gpus":8,"healthy":8,"degraded":0,"failed":0},"power":{"draw_w":4000,"limit_w":5600},"versions":{"agent":"0.1.0","driver":"550.54.15","os":"hearth 1"},"desired_generation":1})
print(f"row sizes: gpus {len(gpus)} B, hardware {len(hw)} B, heartbeat {len(hb)} B")
d=tempfile.mkdtemp(prefix="hearth-liveness-rows.")
def mk(path, narrow):
    c=sqlite3.connect(path, isolation_level=None); c.execute("PRAGMA journal_mode=WAL"); c.execute("PRAGMA synchronous=FULL")
    c.execute("""CREATE TABLE nodes (id TEXT PRIMARY KEY, token_id TEXT NOT NULL, dmi_uuid TEXT NOT NULL, board_serial TEXT NOT NULL, hardware TEXT NOT NULL, hostname TEXT NOT NULL, gpus TEXT NOT NULL, agent_version TEXT NOT NULL, enrolled_ms BIGINT NOT NULL, cert_serial TEXT NOT NULL, cert_not_after_ms BIGINT NOT NULL, desired TEXT NOT NULL, revoked BIGINT NOT NULL""" + ("" if narrow else ", last_seen_ms BIGINT, heartbeat TEXT, protocol_version BIGINT, gateway TEXT") + ")")
    c.execute("CREATE UNIQUE INDEX nodes_hardware ON nodes (dmi_uuid, board_serial)")
    if narrow: c.execute("CREATE TABLE node_liveness (node_id TEXT PRIMARY KEY, last_seen_ms BIGINT, heartbeat TEXT, protocol_version BIGINT, gateway TEXT)")
    c.execute("BEGIN")
    for i in range(N):
        c.execute("INSERT INTO nodes (id,token_id,dmi_uuid,board_serial,hardware,hostname,gpus,agent_version,enrolled_ms,cert_serial,cert_not_after_ms,desired,revoked) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,0)",
                  (f"n-{i:08x}","tok",f"uuid-{i}",f"SN{i}",hw,f"node{i}",gpus,"0.1.0",1,"abcdef0123456789",2,desired))
        if narrow: c.execute("INSERT INTO node_liveness (node_id) VALUES (?)",(f"n-{i:08x}",))
    c.execute("COMMIT"); return c
wide=mk(os.path.join(d,"wide.db"),False); narrow=mk(os.path.join(d,"narrow.db"),True)
ids=[f"n-{i:08x}" for i in range(N)]
def batch(c, sql, t):
    t0=time.process_time(); w0=time.perf_counter()
    c.execute("BEGIN IMMEDIATE")
    for k in ids: c.execute(sql,(k,t,hb,2,"g1"))
    c.execute("COMMIT")
    return (time.process_time()-t0)/N*1e6, (time.perf_counter()-w0)/N*1e6
W="UPDATE nodes SET last_seen_ms = ?2, heartbeat = ?3, protocol_version = ?4, gateway = ?5 WHERE id = ?1"
Nn="UPDATE node_liveness SET last_seen_ms = ?2, heartbeat = ?3, protocol_version = ?4, gateway = ?5 WHERE node_id = ?1"
res={"wide":[], "narrow":[]}
for r in range(6):
    res["wide"].append(batch(wide,W,1000+r)); res["narrow"].append(batch(narrow,Nn,1000+r))
med={}
for k,v in res.items():
    v=v[1:]  # first batch warms the cache
    cpu=sorted(x[0] for x in v); wall=sorted(x[1] for x in v)
    med[k]=cpu[len(cpu)//2]
    print(f"{k:6}: CPU µs/row median {cpu[len(cpu)//2]:.1f} (min {cpu[0]:.1f}, max {cpu[-1]:.1f}); wall µs/row median {wall[len(wall)//2]:.1f}")
print(f"narrow / wide CPU per row: {med['narrow'] / med['wide']:.2f}")
print("sqlite", sqlite3.sqlite_version, "load", open("/proc/loadavg").read().split()[:3])
import shutil; shutil.rmtree(d)
