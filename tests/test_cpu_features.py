"""CPU feature detection and the load-time check of a CPU bundle's path (runtime side, torch-free)."""
import logging

from runtime.cpu_features import CpuInfo, check_cpu_path, parse_cpuinfo, this_cpu

X86 = """processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC
cpu MHz		: 2596.150
flags		: fpu sse sse2 avx fma avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni

processor	: 1
model name	: AMD EPYC
flags		: fpu sse sse2 avx fma avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni
"""
ARM = """processor	: 0
BogoMIPS	: 50.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU part	: 0xd0c

processor	: 1
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
"""
PATH = {"target": "cpu", "path": "openvino-bf16", "arch": "x86_64", "requires": ["avx512_bf16"],
        "settings": {"inference_precision": "bf16"},
        "fallback": {"settings": {"inference_precision": "f32"}, "note": "OpenVINO in FP32"}}


def test_parse_x86_and_arm():
    x86 = parse_cpuinfo(X86, machine="x86_64")
    assert x86.arch == "x86_64" and x86.cores == 2 and x86.mhz == 2596.15 and x86.model == "AMD EPYC"
    assert x86.has("avx512_vnni", "avx512_bf16") and not x86.has("amx_int8")
    arm = parse_cpuinfo(ARM, machine="aarch64")
    assert arm.arch == "aarch64" and arm.cores == 2 and arm.has("asimd", "asimddp") and not arm.has("i8mm")


def test_this_cpu_reads_the_machine():
    cpu = this_cpu()
    assert cpu.arch in ("x86_64", "aarch64") and cpu.flags  # /proc/cpuinfo exists on the test machines


def test_a_bundle_without_cpu_path_needs_nothing():
    assert check_cpu_path({"backend": "onnxruntime"}).warning is None


def test_matching_cpu_keeps_the_path_settings(caplog):
    cpu = parse_cpuinfo(X86, machine="x86_64")
    with caplog.at_level(logging.WARNING):
        check = check_cpu_path({"cpu": PATH}, cpu)
    assert check.settings == {"inference_precision": "bf16"} and check.warning is None and not caplog.records


def test_missing_feature_falls_back_with_one_warning(caplog):
    cpu = CpuInfo(arch="x86_64", flags=frozenset({"avx2", "fma", "avx512f"}))
    with caplog.at_level(logging.WARNING):
        check = check_cpu_path({"cpu": PATH}, cpu, where="engines/x")
    assert check.settings == {"inference_precision": "f32"}
    assert "engines/x" in check.warning and "lacks avx512_bf16" in check.warning and "--target cpu" in check.warning
    assert len(caplog.records) == 1


def test_other_architecture_falls_back(caplog):
    cpu = parse_cpuinfo(ARM, machine="aarch64")
    with caplog.at_level(logging.WARNING):
        check = check_cpu_path({"cpu": PATH}, cpu)
    assert "built for x86_64, this CPU is aarch64" in check.warning
    assert check.settings["inference_precision"] == "f32" and len(caplog.records) == 1
