"""What the Kubernetes schemas cannot check in rendered manifests (see
validate.sh): modelfs flags that exist, privilege where propagation needs it,
memory caches within limits, peer Services that see pods before they are
ready. One line per problem, exit 1 if any."""

import re
import subprocess
import sys

import yaml

# modelfs flags: G, GiB and Gi all mean GiB (as `--cache-size` reads them).
UNITS = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
         "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
         "G": 1 << 30, "M": 1 << 20, "K": 1 << 10}
# Kubernetes quantities: G, M, k are decimal there.
K8S_UNITS = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def qty(s, units=UNITS):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(s))
    if not m or m.group(2) not in units:
        raise ValueError(f"cannot read the size {s!r}")
    return int(float(m.group(1)) * units[m.group(2)])


def k8s_qty(s):
    return qty(s, K8S_UNITS)


def flags_of(binary, sub, cache={}):
    if sub not in cache:
        help_text = subprocess.run([binary, sub, "--help"], capture_output=True,
                                   text=True, check=True).stdout
        cache[sub] = set(re.findall(r"--[a-z][a-z0-9-]*", help_text))
    return cache[sub]


def pod_specs(doc):
    spec = doc.get("spec", {})
    if doc["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
        yield spec["template"]["spec"]
    elif doc["kind"] == "Pod":
        yield spec


def main():
    binary, path = sys.argv[1], sys.argv[2]
    problems = []
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Service" and doc["spec"].get("clusterIP") == "None":
            if not doc["spec"].get("publishNotReadyAddresses"):
                problems.append(f"{where}: a headless peer Service needs publishNotReadyAddresses: true")
        for pod in pod_specs(doc):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for c in pod.get("initContainers", []) + pod.get("containers", []):
                cw = f"{where} container {c['name']}"
                env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
                words = " ".join(c.get("command", []) + c.get("args", []))
                words = re.sub(r"\$\(([A-Z_]+)\)", lambda m: env.get(m.group(1), ""), words)
                words = re.sub(r"\"?\$\{?([A-Z_]+)\}?\"?", lambda m: env.get(m.group(1), m.group(0)), words)
                for m in re.finditer(r"\bmodelfs\s+([a-z]+)((?:\s+(?!modelfs\b)[^\s;&|]+)*)", words):
                    sub, rest = m.group(1), m.group(2)
                    for flag in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", rest):
                        if flag not in flags_of(binary, sub):
                            problems.append(f"{cw}: `modelfs {sub}` has no flag {flag}")
                    size = re.search(r"--cache-size[= ](\S+)", rest)
                    cache_dir = re.search(r"--cache-dir[= ](\S+)", rest)
                    if size and cache_dir:
                        want = qty(size.group(1))
                        for vm in c.get("volumeMounts", []):
                            vol = volumes.get(vm["name"], {})
                            ed = vol.get("emptyDir") or {}
                            mp = vm["mountPath"].rstrip("/")
                            under = cache_dir.group(1) == mp or cache_dir.group(1).startswith(mp + "/")
                            if not under or ed.get("medium") != "Memory":
                                continue
                            limit = ed.get("sizeLimit")
                            if not limit or k8s_qty(limit) < want:
                                problems.append(f"{cw}: the memory cache volume {vm['name']} needs a sizeLimit of at least --cache-size {size.group(1)}")
                            mem = c.get("resources", {}).get("limits", {}).get("memory")
                            if not mem or k8s_qty(mem) < k8s_qty(limit or 0):
                                problems.append(f"{cw}: tmpfs pages count against the memory limit: limits.memory must be at least the cache volume's sizeLimit")
                for vm in c.get("volumeMounts", []):
                    if vm.get("mountPropagation") == "Bidirectional" and not c.get("securityContext", {}).get("privileged"):
                        problems.append(f"{cw}: Bidirectional mount propagation needs privileged: true")
    for p in problems:
        print(f"{path}: {p}", file=sys.stderr)
    sys.exit(1 if problems else 0)


main()
