import json, sys, glob, math, collections
rows = collections.defaultdict(dict)
for f in sorted(glob.glob("*.jsonl")):
    tag = f.split(".")[0]
    for l in open(f):
        d = json.loads(l)
        if d["provider"] != "ours-dora-triton": continue
        k = (d["mode"], d["shape"], d["r"])
        rows[k][tag] = (d["gpu_ratio_to_floor"], d["ratio_to_floor"], d["gpu_ms"], d["median_ms"])
tags = ["A_0", "B_1", "A_2", "B_3"]
print("mode    shape        r  | GPU ratio A0 B1 A2 B3 | wall ratio A0 B1 A2 B3 | B/A GPU ms (mean of each side)")
bya = collections.defaultdict(list)
for k in sorted(rows):
    v = rows[k]
    g = " ".join(f"{v[t][0]:.3f}" if t in v else "  -  " for t in tags)
    w = " ".join(f"{v[t][1]:.3f}" if t in v else "  -  " for t in tags)
    a = [v[t][2] for t in tags if t in v and t[0] == "A"]; b = [v[t][2] for t in tags if t in v and t[0] == "B"]
    aw = [v[t][3] for t in tags if t in v and t[0] == "A"]; bw = [v[t][3] for t in tags if t in v and t[0] == "B"]
    r = (sum(b)/len(b)) / (sum(a)/len(a)); rw = (sum(bw)/len(bw)) / (sum(aw)/len(aw))
    bya[k[0]].append((r, rw))
    print(f"{k[0]:7} {k[1]:12} {k[2]:2} | {g} | {w} | GPU {r:.3f} wall {rw:.3f}")
for m, l in bya.items():
    print(m, "geomean B/A GPU %.3f wall %.3f" % (math.exp(sum(math.log(x[0]) for x in l)/len(l)), math.exp(sum(math.log(x[1]) for x in l)/len(l))))
for t in tags:
    for m in ("fwd", "fwd_bwd"):
        l = [rows[k][t][0] for k in rows if k[0] == m and t in rows[k]]
        lw = [rows[k][t][1] for k in rows if k[0] == m and t in rows[k]]
        if l: print(t, m, "n=%d GPU geomean %.3f wall %.3f" % (len(l), math.exp(sum(map(math.log, l))/len(l)), math.exp(sum(map(math.log, lw))/len(lw))))
