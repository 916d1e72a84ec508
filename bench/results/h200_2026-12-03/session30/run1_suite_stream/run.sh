#!/usr/bin/env bash
# Session 30, device run 1: build (saved as site.tgz) with the streaming passes' bench alongside (torch-free; the
# side-operand plan timed where it differs); then the whole GPU suite on this tree (the Triton auto main loop default
# under CUDA graphs, sync-debug mode, specialisation and fast-launch tests included).
R=$PWD; O=$OUT/r; mkdir -p $O/stream
pack() { tar -czf $OUT/run.tgz.tmp -C $OUT r && mv $OUT/run.tgz.tmp $OUT/run.tgz; }
(OUT=$O/stream STEPS="stream" T_STREAM=200 timeout 210 bash bench/tools/gpu_session.sh > $O/session_stream.log 2>&1) &
OUT=$O STEPS="build save" T_BUILD=228 timeout 238 bash bench/tools/gpu_session.sh > $O/session1.log 2>&1
mv $O/site.tgz $OUT/site.tgz 2>/dev/null
wait; pack
OUT=$O STEPS="build tests" REUSE_BUILD=1 T_TESTS=335 timeout 345 bash bench/tools/gpu_session.sh > $O/session2.log 2>&1
pack; rm -rf $O
