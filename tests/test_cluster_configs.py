"""Cluster configs users deploy (serve_configs/), and autoscaling proven on a simulated cluster.

Static (fast): every manifest / YAML loads and passes Ray's own validation (Serve's deploy schema,
the cluster launcher's schema, the KubeRay autoscaler's derivation of node types from a RayCluster
spec); the Serve config embedded in the RayService's ``serveConfigV2`` equals
``serve_configs/cluster.yaml`` (the file ``serve deploy`` uses on VMs); what the engine replicas,
the ingress and the Train workers ask for (CPU/GPU/memory/custom resources, from the same code
that builds their ``ray_actor_options`` / ``ScalingConfig``) fits some worker group, and the groups'
maximum sizes can hold the maximum replica / worker counts; ``RAY_AUTH_MODE`` agrees everywhere.

Simulated (slow): ``serve_configs/sim_cluster.yaml`` started with Ray's fake_multinode provider
(``bd_ray.testing.sim_cluster``): the Serve app scales past what the head holds, the autoscaler adds
nodes, the extra replicas run there, requests succeed, and after the load replicas and then nodes
are released; a Train run with more workers than the head holds gets a node added and shards the
teacher across workers on different nodes. Both print their timeline
(``benchmarks/autoscaling_timeline.py`` runs the same scenario and writes
``results/autoscaling/timeline.json``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
from pathlib import Path

import pytest
import yaml

from bd_ray.config import ConfigError
from bd_ray.serve.app import engine_options, ingress_options
from bd_ray.config.serve import load_serve_config
from bd_ray.config.train import load_train_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "serve_configs"
MEM_ADVERTISED = 0.7  # Ray advertises ~70 % of a node's RAM as `memory` (30 % object store)


def load(rel: str) -> dict:
    return yaml.safe_load((REPO / rel).read_text())


def actor_demand(opts: dict) -> dict[str, float]:
    """Serve ``ray_actor_options`` -> the resource dict Ray schedules the replica with."""
    d = {"CPU": opts.get("num_cpus", 0) or 0, "GPU": opts.get("num_gpus", 0) or 0,
         "memory": opts.get("memory") or 0, **opts.get("resources", {})}
    return {k: v for k, v in d.items() if v}


def per_node(demand: dict[str, float], node: dict[str, float], mem_factor: float = 1.0) -> int:
    """How many actors with ``demand`` one node with resources ``node`` holds."""
    n = math.inf
    for k, v in demand.items():
        have = node.get(k, 0) * (mem_factor if k == "memory" else 1.0)
        n = min(n, math.floor(have / v + 1e-9))
    return int(n) if n != math.inf else 1 << 30


def kuberay_node_types(manifest: dict, spec_key: str) -> dict:
    """Node types the KubeRay autoscaler derives from the manifest's RayCluster spec (Ray's own code)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"metadata": {"name": manifest["metadata"]["name"], "namespace": "default"},
          "spec": manifest["spec"][spec_key]}
    return _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]


def launcher_config(rel: str) -> dict:
    """A cluster-launcher YAML with Ray's provider defaults filled in, validated by Ray's schema."""
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    cfg = fillout_defaults(load(rel))
    validate_config(cfg)
    return cfg


def check_placement(demand: dict, count: int, node_types: dict, head_type: str, mem_factor: float,
                    what: str, head_may_hold: bool = False) -> None:
    """``count`` actors with ``demand`` fit the worker types' maximum sizes; each custom resource
    they ask for exists in some worker type; with ``head_may_hold`` False none fits the head."""
    workers = {k: v for k, v in node_types.items() if k != head_type}
    fits = {k: per_node(demand, v["resources"], mem_factor) for k, v in workers.items()}
    assert any(fits.values()), f"{what} {demand} fits no worker type: " \
        f"{ {k: v['resources'] for k, v in workers.items()} }"
    head_holds = per_node(demand, node_types[head_type]["resources"], mem_factor)
    if not head_may_hold:
        assert head_holds == 0, f"{what} fits the head ({head_holds}); it should land on worker nodes"
    capacity = head_holds + sum(fits[k] * workers[k]["max_workers"] for k in workers)
    assert capacity >= count, f"{what}: {count} needed, the node types hold at most {capacity}"


# ---------------------------------------------------------------------------------------------
# Static: the configs users deploy
# ---------------------------------------------------------------------------------------------


def test_cluster_serve_config_is_valid_and_serves_gpu_yaml():
    from ray.serve.schema import ServeDeploySchema

    cluster = load("serve_configs/cluster.yaml")
    ServeDeploySchema.model_validate(cluster)  # what `serve deploy` / KubeRay submit
    gpu = load("serve_configs/gpu.yaml")
    for app, gapp in zip(cluster["applications"], gpu["applications"]):
        cfg = load_serve_config(app["args"])
        # same models and speculative settings as the single-machine GPU config; placement added
        for section in ("model", "spec", "speculation", "defaults"):
            assert app["args"][section] == gapp["args"][section], section
        opts = engine_options(cfg)["ray_actor_options"]
        assert opts["num_gpus"] == 1 and opts["memory"] > 0 and opts["resources"] == {"gpu_a10g": 1}
        assert ingress_options(cfg)["ray_actor_options"]["memory"] > 0
    assert cluster["http_options"]["host"] == "0.0.0.0"


def test_rayservice_embeds_cluster_yaml_and_its_groups_hold_the_app():
    m = load("serve_configs/kuberay/rayservice.yaml")
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayService"
    embedded = yaml.safe_load(m["spec"]["serveConfigV2"])
    assert embedded == load("serve_configs/cluster.yaml"), \
        "serveConfigV2 differs from serve_configs/cluster.yaml: paste the file into the manifest again"
    rc = m["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True
    types = kuberay_node_types(m, "rayClusterConfig")
    for app in embedded["applications"]:
        cfg = load_serve_config(app["args"])
        check_placement(actor_demand(engine_options(cfg)["ray_actor_options"]), cfg.engine.autoscaling.max_replicas,
                        types, "headgroup", MEM_ADVERTISED, "engine replica")
        check_placement(actor_demand(ingress_options(cfg)["ray_actor_options"]), cfg.ingress.num_replicas,
                        types, "headgroup", MEM_ADVERTISED, "ingress replica", head_may_hold=True)
    gpu_groups = [g for g in rc["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups and all(g["minReplicas"] <= g["maxReplicas"] for g in gpu_groups)
    assert_auth_mode_everywhere(rc)


def _train_cfg_from_entrypoint(entrypoint: str):
    # `[python /app/jobs/draft_vocab.py ... --out DIR &&] python /app/jobs/train_drafter.py ...`: a
    # draft vocabulary the config names must be built by the job itself (runs/ is not in the image).
    *before, train = [shlex.split(part) for part in entrypoint.split("&&")]
    argv = train
    assert argv[:2] == ["python", "/app/jobs/train_drafter.py"], argv
    built = {b[b.index("--out") + 1] for b in before if b[:2] == ["python", "/app/jobs/draft_vocab.py"]}
    vocab = [a.split("=", 1)[1] for a in argv if a.startswith("models.draft_vocab=")]
    assert all(v == "null" or str(Path(v).parent) in built for v in vocab), (vocab, built)
    config = argv[argv.index("--config") + 1].replace("/app/", str(REPO) + "/", 1)
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return load_train_config(config, sets)


def test_rayjob_train_workers_fit_and_share_storage():
    m = load("serve_configs/kuberay/rayjob.yaml")
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayJob"
    cfg = _train_cfg_from_entrypoint(m["spec"]["entrypoint"])  # the job's own config, validated
    spec = m["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    types = kuberay_node_types(m, "rayClusterSpec")
    check_placement(cfg.run.worker_resources(), cfg.run.num_workers, types, "headgroup", MEM_ADVERTISED,
                    "Train worker")
    # more than one node, so the teacher is sharded across nodes
    group = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "cpu-train")
    assert per_node(cfg.run.worker_resources(), types["cpu-train"]["resources"], MEM_ADVERTISED) < cfg.run.num_workers
    # checkpoints and the model cache on a volume every pod mounts
    for pod in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        c = pod["spec"]["containers"][0]
        mounts = [v["mountPath"] for v in c.get("volumeMounts", [])]
        assert any(cfg.run.output_dir.startswith(p) for p in mounts), (c["name"], cfg.run.output_dir, mounts)
        home = {e["name"]: e.get("value") for e in c["env"]}["BD_RAY_HOME"]
        assert any(home.startswith(p) for p in mounts), (c["name"], home)
    assert group["maxReplicas"] >= group["minReplicas"]
    assert_auth_mode_everywhere(spec, m["spec"]["submitterPodTemplate"])


def assert_auth_mode_everywhere(cluster_spec: dict, *extra_pods: dict) -> None:
    """RAY_AUTH_MODE is set, to one value, in every Ray container and the autoscaler (Ray 2.60 token auth)."""
    envs = [cluster_spec["autoscalerOptions"].get("env", [])]
    pods = [cluster_spec["headGroupSpec"]["template"]] + [g["template"] for g in cluster_spec["workerGroupSpecs"]]
    pods += list(extra_pods)
    envs += [c.get("env", []) for p in pods for c in p["spec"]["containers"]]
    modes = [{e["name"]: e.get("value") for e in env}.get("RAY_AUTH_MODE") for env in envs]
    assert None not in modes and len(set(modes)) == 1, modes


def test_vm_cluster_launcher_holds_serve_and_train():
    cfg = launcher_config("serve_configs/vm/aws.yaml")
    types, head = cfg["available_node_types"], cfg["head_node_type"]
    for app in load("serve_configs/cluster.yaml")["applications"]:
        scfg = load_serve_config(app["args"])
        check_placement(actor_demand(engine_options(scfg)["ray_actor_options"]),
                        scfg.engine.autoscaling.max_replicas, types, head, 1.0, "engine replica")
        check_placement(actor_demand(ingress_options(scfg)["ray_actor_options"]), scfg.ingress.num_replicas,
                        types, head, 1.0, "ingress replica", head_may_hold=True)
    # the training command of the header comment is the RayJob's
    tcfg = _train_cfg_from_entrypoint(load("serve_configs/kuberay/rayjob.yaml")["spec"]["entrypoint"])
    check_placement(tcfg.run.worker_resources(), tcfg.run.num_workers, types, head, 1.0, "Train worker")
    assert sum(t["max_workers"] for k, t in types.items() if k != head) <= cfg["max_workers"]
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=disabled" in c for c in starts if "ray start" in c)
    assert "--env RAY_AUTH_MODE=disabled" in cfg["docker"]["run_options"]
    head_cmd = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_cmd
    assert f"--num-cpus={types[head]['resources']['CPU']}" in head_cmd


def _bench():
    spec = importlib.util.spec_from_file_location("autoscaling_timeline", REPO / "benchmarks" / "autoscaling_timeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sim_cluster_config_forces_new_nodes(tmp_path):
    bench = _bench()
    cfg = launcher_config("serve_configs/sim_cluster.yaml")
    types, head = cfg["available_node_types"], cfg["head_node_type"]
    scfg = load_serve_config(bench.app_args(tmp_path, tmp_path, max_replicas=3))
    demand = actor_demand(engine_options(scfg)["ray_actor_options"])
    assert per_node(demand, types[head]["resources"]) == 1  # the head holds min_replicas only
    check_placement(demand, 3, types, head, 1.0, "engine replica", head_may_hold=True)
    tcfg = bench.train_config(tmp_path, num_workers=2)
    assert per_node(tcfg.run.worker_resources(), types[head]["resources"]) == 1
    check_placement(tcfg.run.worker_resources(), 2, types, head, 1.0, "Train worker", head_may_hold=True)


def test_resource_fields_validate_and_pass_through():
    cfg = load_serve_config({"engine": {"memory": 1 << 30, "resources": {"gpu_a10g": 1}}, "ingress": {"memory": 1 << 28}})
    assert engine_options(cfg)["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0, "memory": 1 << 30,
                                                        "resources": {"gpu_a10g": 1.0}}
    assert ingress_options(cfg)["ray_actor_options"] == {"num_cpus": 0.25, "num_gpus": 0.0, "memory": 1 << 28}
    assert engine_options(load_serve_config({}))["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    for bad, field in [({"engine": {"resources": {"GPU": 1}}}, "engine.resources"),
                       ({"engine": {"resources": {"gpu_a10g": 1.5}}}, "engine.resources"),
                       ({"engine": {"resources": {"x": 0}}}, "engine.resources"),
                       ({"engine": {"memory": 0}}, "engine.memory"),
                       ({"ingress": {"memory": -5}}, "ingress.memory")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_serve_config(bad)
    t = load_train_config(None, ["run.memory_per_worker=1073741824", "run.resources_per_worker={gpu_a10g: 1}",
                                 "run.cpus_per_worker=4", "run.use_gpu=true"])
    assert t.run.worker_resources() == {"CPU": 4.0, "GPU": 1, "memory": 1 << 30, "gpu_a10g": 1.0}
    for bad, field in [("run.resources_per_worker={memory: 5}", "run.resources_per_worker"),
                       ("run.memory_per_worker=0", "run.memory_per_worker")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_train_config(None, [bad])


def test_memory_fields_take_units_and_cross_field_errors_name_the_field():
    # Kubernetes / Ray users write memory with units: binary (GiB, Gi) and decimal (GB, G)
    for text, n in [("20GiB", 20 << 30), ("20Gi", 20 << 30), ("20GB", 20 * 10**9), ("20G", 20 * 10**9),
                    ("512MiB", 512 << 20), ("1.5GiB", 3 << 29), ("64kb", 64_000), ("4096", 4096), ("4096B", 4096)]:
        assert load_train_config(None, [f"run.memory_per_worker={text}"]).run.memory_per_worker == n, text
    assert load_serve_config({"engine": {"memory": "12GiB"}}).engine.memory == 12 << 30
    assert load_serve_config({"ingress": {"memory": "1Gi"}}).ingress.memory == 1 << 30
    for bad in ("20 gigs", "12XB", "-5GB", "GiB"):
        with pytest.raises(ConfigError, match=r"run\.memory_per_worker: must be bytes: an integer or a number "
                                              r"with a unit \(B, KB/KiB, MB/MiB, GB/GiB"):
            load_train_config(None, [f"run.memory_per_worker={bad}"])
    with pytest.raises(ConfigError, match=r"engine\.memory: Input should be greater than or equal to 1"):
        load_serve_config({"engine": {"memory": "0GiB"}})
    # model-level checks of the serve config are reported at their field
    with pytest.raises(ConfigError, match=r"spec\.gamma: must be <= speculation\.max_gamma \(8\) \(got 20\)"):
        load_serve_config({"spec": {"gamma": 20}, "speculation": {"max_gamma": 8}})
    with pytest.raises(ConfigError, match=r"engine\.autoscaling\.min_replicas: must be <= max_replicas \(2\)"):
        load_serve_config({"engine": {"autoscaling": {"min_replicas": 5, "max_replicas": 2}}})


# ---------------------------------------------------------------------------------------------
# Simulated cluster (Ray fake_multinode): autoscaling really happens
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim_cluster():
    """The simulated cluster of serve_configs/sim_cluster.yaml with this process connected; always stopped."""
    bench = _bench()
    cluster = bench.start_cluster()
    try:
        yield bench
    finally:
        cluster.stop()


def _print_timeline(name: str, out: dict, tmp_path: Path) -> None:
    path = tmp_path / f"{name}_timeline.json"
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"\n{name} timeline (s since start): {json.dumps(out['events'])}  [{path}]")


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_serve_scales_onto_new_nodes_and_back(sim_cluster, tmp_path):
    bench = sim_cluster
    max_replicas = 2
    out = bench.run_serve(tmp_path / "models", clients=2, max_replicas=max_replicas)
    _print_timeline("serve", out, tmp_path)
    ev, req, peak = out["events"], out["requests"], out["peak"]
    assert out["scaled_up"], f"no scale-up: {ev}"
    # the extra replicas run on nodes the autoscaler added, the head keeps one
    nodes = [r["node_id"] for r in peak["replicas"]]
    assert len(nodes) == max_replicas and nodes.count(out["head_node_id"]) == 1, peak
    extra = {n for n in nodes if n != out["head_node_id"]}
    assert extra and extra <= set(peak["worker_nodes"]), peak
    # every request succeeded, some after the new replicas were up
    assert req["failed"] == 0, req["failures"]
    assert req["ok"] > 0 and req["served_after_scale_up"] > 0, req
    # order and bounds: up under load, replicas then nodes released after it
    assert ev["load_start"] < ev["first_node_up"] <= ev["replicas_up"] < ev["load_end"], ev
    assert out["scaled_down"], f"replicas/nodes not released: {ev}"
    assert ev["load_end"] < ev["replicas_down"] <= ev["nodes_down"] <= ev["load_end"] + 120, ev


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_train_gets_nodes_and_shards_teacher_across_them(sim_cluster, tmp_path):
    bench = sim_cluster
    out = bench.run_train(tmp_path / "train", num_workers=2)
    _print_timeline("train", out, tmp_path)
    assert out["finished"] and out["step"] == 2 and out["world_size"] == 2, out
    nodes = out["worker_nodes_of_train_workers"]
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes  # one worker per (simulated) node
    assert any(n != out["head_node_id"] for n in nodes), nodes
    ev = out["events"]
    assert ev["train_start"] < ev["first_node_up"] < ev["train_end"], ev
    # ZeRO-3 teacher: each worker holds half the parameters, logits equal the dense model
    assert out["teacher_param_fraction_local"] < 0.75
    assert out["teacher_dense_max_abs_diff"] < 1e-5
    assert "nodes_down" in ev, f"training node not released: {ev}"
