"""The device plugin against a fake kubelet over real gRPC on unix sockets: registration (resource names, API
version, endpoints), ListAndWatch (device IDs from NVML, health changes from XIDs), the preferred allocation on one
GPU, Allocate's exact answer, and registering again after the kubelet restarts. The GPUs come from the fake NVML."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from kube_fixtures import FakeKubelet, Stream, fake_nvml, remove, short_dir, wait_for

from gpuwatch.kube.allocate import Injection
from gpuwatch.kube.api import deviceplugin_pb2 as dp
from gpuwatch.kube.deviceplugin import DevicePlugins
from gpuwatch.kube.devices import GPU_RESOURCE, MEMORY_RESOURCE, GiB, GpuInfo, Pairing, preferred
from gpuwatch.kube.health import Health
from gpuwatch.kube.nvml import XidWatcher, read_gpus

A = "GPU-aaaaaaaa-1111-2222-3333-444444444444"
B = "GPU-bbbbbbbb-1111-2222-3333-444444444444"
SHARES = 4
ENDPOINTS = {GPU_RESOURCE: "gpuwatch-gpu.sock", MEMORY_RESOURCE: "gpuwatch-memory.sock"}


def shares(uuid: str, *ks: int) -> list[str]:
    return [f"{uuid}-share-{k}" for k in ks]


def gibs(uuid: str, *ks: int) -> list[str]:
    return [f"{uuid}-gib-{k}" for k in ks]


# ------------------------------------------------------------------------------------------------ pure: choosing


def test_a_preference_keeps_one_gpu_best_fit_first():
    available = shares(A, 0, 1) + shares(B, 0, 1, 2, 3)
    assert preferred(available, [], 2) == shares(A, 0, 1), "best fit: the GPU with the fewest that still fit"
    assert preferred(available, [], 3) == shares(B, 0, 1, 2)
    assert preferred(available, shares(B, 3), 2) == shares(B, 3, 0), "the GPU of what must be included"
    assert preferred(available, [], 2, partner=B) == shares(B, 0, 1), "the partner resource's GPU, where it fits"
    assert preferred(available, [], 3, partner=A) == shares(B, 0, 1, 2), "... and only where it fits"
    spread = preferred(available, [], 5)
    assert sorted(spread) == sorted(shares(B, 0, 1, 2, 3) + shares(A, 0)), "no one GPU fits: the largest first"


def test_pairing_names_the_other_resources_recent_gpu_only():
    pairing = Pairing(window_s=0.2)
    pairing.chose(GPU_RESOURCE, A)
    assert pairing.partner(MEMORY_RESOURCE) == A and pairing.partner(GPU_RESOURCE) is None
    wait_for(lambda: pairing.partner(MEMORY_RESOURCE) is None, 2, "the pairing to lapse")


def test_allocate_injects_the_preload_file_and_cdi_devices_when_asked(tmp_path):
    injection = Injection(str(tmp_path / "lib"), "/run/gw/daemon.sock", preload_file=True, cdi=True)
    injection.prepare()
    assert (tmp_path / "lib" / "ld.so.preload").read_text() == "/opt/gpuwatch/lib/libgpuwatch.so\n"
    r = injection.response([A])
    assert dict(r.envs) == {"LD_PRELOAD": "/opt/gpuwatch/lib/libgpuwatch.so",
                            "GPUWATCH_SOCKET": "/run/gpuwatch/daemon.sock"}, "CDI names the GPU instead of the env"
    assert [(m.container_path, m.host_path, m.read_only) for m in r.mounts] == [
        ("/opt/gpuwatch/lib", str(tmp_path / "lib"), True), ("/run/gpuwatch", "/run/gw", True),
        ("/etc/ld.so.preload", str(tmp_path / "lib" / "ld.so.preload"), True)]
    assert [d.name for d in r.cdi_devices] == [f"nvidia.com/gpu={A}"]


# ------------------------------------------------------------------------------------------------ a fake kubelet


@pytest.fixture
def kubelet_and_plugins(tmp_path) -> Iterator[tuple[FakeKubelet, DevicePlugins, Path]]:
    nv = fake_nvml(tmp_path / "nvml", [(A, 8 * GiB + 300 * (1 << 20)), (B, 4 * GiB)])
    gpus = read_gpus(nv)
    assert gpus == [GpuInfo(A, 8 * GiB + 300 * (1 << 20), 0), GpuInfo(B, 4 * GiB, 1)]
    xids = XidWatcher(nv, Health())  # the fake NVML has no events: the watcher says so and ends, nothing fails
    xids.start()
    xids.stop()
    directory = short_dir("gwk-dp-")
    kubelet = FakeKubelet(directory)
    plugins = DevicePlugins(str(directory), Injection("/var/lib/gpuwatch/lib", "/run/gpuwatch/gpuwatch.sock"), gpus,
                            SHARES, poll_s=0.1)
    plugins.start()
    try:
        yield kubelet, plugins, directory
    finally:
        plugins.stop()
        kubelet.stop()
        remove(directory)


def expect_registrations(kubelet: FakeKubelet) -> None:
    got = kubelet.registered(2)
    assert sorted((r.resource_name, r.endpoint, r.version, r.options.get_preferred_allocation_available,
                   r.options.pre_start_required) for r in got) == [
        (GPU_RESOURCE, ENDPOINTS[GPU_RESOURCE], "v1beta1", True, False),
        (MEMORY_RESOURCE, ENDPOINTS[MEMORY_RESOURCE], "v1beta1", True, False)]


def ids(response: dp.ListAndWatchResponse) -> list[tuple[str, str]]:
    return [(d.ID, d.health) for d in response.devices]


@pytest.mark.root
def test_the_plugin_registers_lists_its_devices_and_reports_hardware_errors(kubelet_and_plugins):
    kubelet, plugins, directory = kubelet_and_plugins
    expect_registrations(kubelet)
    gpu, memory = kubelet.plugin(ENDPOINTS[GPU_RESOURCE]), kubelet.plugin(ENDPOINTS[MEMORY_RESOURCE])
    options = gpu.GetDevicePluginOptions(dp.Empty(), timeout=5)
    assert (options.pre_start_required, options.get_preferred_allocation_available) == (False, True)

    shares_stream, memory_stream = Stream(gpu.ListAndWatch(dp.Empty())), Stream(memory.ListAndWatch(dp.Empty()))
    healthy = [(i, "Healthy") for i in shares(A, 0, 1, 2, 3) + shares(B, 0, 1, 2, 3)]
    assert ids(shares_stream.next()) == healthy
    assert ids(memory_stream.next()) == [(i, "Healthy") for i in gibs(A, *range(8)) + gibs(B, *range(4))], \
        "one device per whole GiB of NVML's total"

    assert not plugins.health.xid(B, 31), "XID 31 (a page fault) is an application's error"
    assert shares_stream.quiet(0.5), "an application's error changes nothing"
    assert plugins.health.xid(B, 79), "XID 79: the GPU fell off the bus"
    assert ids(shares_stream.next()) == [(i, "Healthy") for i in shares(A, 0, 1, 2, 3)] + [
        (i, "Unhealthy") for i in shares(B, 0, 1, 2, 3)]
    assert [h for _, h in ids(memory_stream.next())] == ["Healthy"] * 8 + ["Unhealthy"] * 4
    plugins.health.mark(B, None)
    assert ids(shares_stream.next()) == healthy
    shares_stream.cancel()
    memory_stream.cancel()


@pytest.mark.root
def test_preferences_keep_shares_and_memory_on_one_gpu_and_allocate_injects_the_interposer(kubelet_and_plugins):
    kubelet, plugins, _ = kubelet_and_plugins
    expect_registrations(kubelet)
    gpu, memory = kubelet.plugin(ENDPOINTS[GPU_RESOURCE]), kubelet.plugin(ENDPOINTS[MEMORY_RESOURCE])

    # A has 2 shares left, B all 4: two shares fit A best; the memory (3 GiB would fit B best) follows them to A
    ask = dp.ContainerPreferredAllocationRequest(available_deviceIDs=shares(A, 2, 3) + shares(B, 0, 1, 2, 3),
                                                 allocation_size=2)
    got = gpu.GetPreferredAllocation(dp.PreferredAllocationRequest(container_requests=[ask]), timeout=5)
    assert list(got.container_responses[0].deviceIDs) == shares(A, 2, 3)
    ask = dp.ContainerPreferredAllocationRequest(available_deviceIDs=gibs(A, *range(8)) + gibs(B, *range(4)),
                                                 allocation_size=3)
    got = memory.GetPreferredAllocation(dp.PreferredAllocationRequest(container_requests=[ask]), timeout=5)
    assert list(got.container_responses[0].deviceIDs) == gibs(A, 0, 1, 2)

    answer = gpu.Allocate(dp.AllocateRequest(container_requests=[
        dp.ContainerAllocateRequest(devices_ids=shares(A, 2, 3)),
        dp.ContainerAllocateRequest(devices_ids=shares(B, 0) + shares(A, 0, 1))]), timeout=5)
    first, second = answer.container_responses
    assert dict(first.envs) == {"LD_PRELOAD": "/opt/gpuwatch/lib/libgpuwatch.so",
                                "GPUWATCH_SOCKET": "/run/gpuwatch/gpuwatch.sock", "NVIDIA_VISIBLE_DEVICES": A}
    assert [(m.container_path, m.host_path, m.read_only) for m in first.mounts] == [
        ("/opt/gpuwatch/lib", "/var/lib/gpuwatch/lib", True), ("/run/gpuwatch", "/run/gpuwatch", True)]
    assert (list(first.devices), dict(first.annotations), list(first.cdi_devices)) == ([], {}, [])
    assert second.envs["NVIDIA_VISIBLE_DEVICES"] == f"{A},{B}", "spanning GPUs: most devices first"

    for wrong in (gibs(A, 0), ["GPU-not-ours-share-0"], []):
        with pytest.raises(grpc.RpcError) as failed:
            gpu.Allocate(dp.AllocateRequest(container_requests=[dp.ContainerAllocateRequest(devices_ids=wrong)]),
                         timeout=5)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, wrong
    assert gpu.PreStartContainer(dp.PreStartContainerRequest(devices_ids=shares(A, 0)), timeout=5) == \
        dp.PreStartContainerResponse()


@pytest.mark.root
def test_a_kubelet_restart_deletes_the_sockets_and_the_plugin_registers_again(kubelet_and_plugins):
    kubelet, plugins, directory = kubelet_and_plugins
    expect_registrations(kubelet)
    stream = Stream(kubelet.plugin(ENDPOINTS[GPU_RESOURCE]).ListAndWatch(dp.Empty()))
    assert stream.next() is not None
    kubelet.restart()  # every socket deleted, a new kubelet.sock
    expect_registrations(kubelet)
    assert stream.next(5) is None, "the old stream ended with its server"
    for name in ENDPOINTS.values():
        assert (directory / name).is_socket()
    again = Stream(kubelet.plugin(ENDPOINTS[MEMORY_RESOURCE]).ListAndWatch(dp.Empty()))
    assert len(again.next().devices) == 12, "the new socket serves"
    again.cancel()

    (directory / ENDPOINTS[MEMORY_RESOURCE]).unlink()  # only one plugin's socket goes
    (request,) = kubelet.registered(1)
    assert request.resource_name == MEMORY_RESOURCE
    assert kubelet.registrations.empty()

    kubelet.restart(delete_plugins=False)  # a new kubelet.sock alone: registered with again all the same
    expect_registrations(kubelet)


def test_the_plugin_waits_for_a_kubelet_that_is_not_there_yet():
    directory = short_dir("gwk-late-")
    plugins = DevicePlugins(str(directory), Injection("/l", "/run/gpuwatch/gpuwatch.sock"), [GpuInfo(A, 2 * GiB)],
                            SHARES, poll_s=0.1)
    plugins.start()
    kubelet = None
    try:
        wait_for(lambda: (directory / ENDPOINTS[GPU_RESOURCE]).is_socket(), 5, "the plugin's socket")
        assert plugins.endpoints[0].registered_with is None
        kubelet = FakeKubelet(directory)
        expect_registrations(kubelet)
        plugins.stop()
        assert not list(directory.glob("gpuwatch-*.sock")), "stop() removes its sockets"
    finally:
        plugins.stop()
        if kubelet:
            kubelet.stop()
        remove(directory)
