#!/usr/bin/env python3
"""Writes the big-mesh config of issue 13: 500 virtual hosts x 41 routes (a header matcher
each) and 2,000 clusters of 2 endpoints. Usage: gen.py OUT.yaml LISTEN_PORT ADMIN_PORT [VARIANT]
(each next VARIANT changes one thing: odd ones a cluster's endpoint weight, even ones a
virtual host's first route, so reloads alternate one-cluster and one-virtual-host changes)."""
import sys

out, port, admin = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
variant = int(sys.argv[4]) if len(sys.argv) > 4 else 0
lines = [f"admin: {{ address: 127.0.0.1:{admin} }}",
         "listeners:",
         f"  - {{ name: main, address: 127.0.0.1:{port}, route_config: big }}",
         "route_configs:", "  - name: big", "    virtual_hosts:"]
weight = 2 if ((variant + 1) // 2) % 2 == 1 else 1
edited = (variant // 2) % 2 == 1
for v in range(500):
    lines.append(f"      - name: vh{v}")
    lines.append(f"        domains: [\"svc{v}.mesh.local\", \"svc{v}\"]")
    lines.append("        routes:")
    for r in range(40):
        c = (v * 41 + r) % 2000
        api = "apiv2" if (edited and v == 0 and r == 0) else "api"
        lines.append(f"          - match: {{ prefix: /{api}/v{r}/, headers: [{{ name: x-tenant, exact: t{r} }}] }}")
        lines.append(f"            cluster: c{c}")
    lines.append(f"          - {{ match: {{ prefix: / }}, cluster: c{v % 2000} }}")
lines.append("clusters:")
for c in range(2000):
    w = weight if c == 0 else 1
    lines.append(f"  - name: c{c}")
    lines.append(f"    endpoints: [{{ address: \"127.0.0.{1 + c % 200}:{10000 + c}\", weight: {w} }}, {{ address: \"127.0.1.{1 + c % 200}:{10000 + c}\" }}]")
open(out, "w").write("\n".join(lines) + "\n")
