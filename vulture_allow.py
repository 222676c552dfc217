"""Names the dead-code check (vulture, `make lint`) cannot see used.

Each is used by something vulture does not read: a framework calling it by
name, a string naming it, or C. Add a name here only with that reason; code
nobody uses is deleted, not listed.
"""

# ruff: noqa: B018 (bare names are how vulture reads an allow-list)
from rome_guard.detect import regex, stateful
from rome_guard.gpu import allocations
from rome_guard.layout import sensor, wire
from rome_guard.handlers import wire as wire_handler
from rome_guard.respond import metrics, responses
from rome_guard.sensors import nvml
from rome_guard.sensors import wire as wire_sensor
from tests.fixtures import kubelet, receivers

# http.server and socketserver read these by name
metrics._Handler.server_version
metrics._Handler.sys_version
metrics._Handler.protocol_version
metrics._Handler.do_GET
metrics._Handler.do_HEAD
metrics._Handler.log_message
metrics._HttpServer.daemon_threads
metrics._HttpServer.allow_reuse_address
metrics._HttpServer.request_queue_size
metrics._HttpServer.address_family
metrics._HttpServer.handle_error
# http.server calls the test receivers' handlers by name too
receivers._Handler.do_POST
# re2.Options fields, set by name
regex._OPTIONS.case_sensitive
regex._OPTIONS.log_errors
regex._OPTIONS.max_mem
# mirrors of C constants, checked against the headers through the CONSTANTS
# names (rome_guard/layout/__init__.py, tests/test_layout.py)
sensor.ARGV_MAX_ARGS
sensor.ARGC_COUNT_MAX
sensor.EXEC_ARGV_FAULT
sensor.EXEC_ARGC_CAPPED
sensor.EXEC_FILENAME_TRUNCATED
sensor.SOURCE_CONNECT
sensor.SOURCE_SEND
sensor.SOURCE_UDP_SENDMSG
sensor.GPU_PATH_PREFIX_LEN
sensor.LOST_SLOTS
sensor.TABLE_SLOTS
sensor.PROC_EXITED
sensor.PROC_HELD
sensor.NEEDLE_SCAN_MAX
wire.WIRE_METHOD_SCAN
wire.WIRE_PID_OF_FLOW
wire.WIRE_QNAME_MAX
wire.WIRE_SETTINGS
wire.WIRE_STREAM_MAX
wire.WIRE_SEGMENTS_MAX
wire.WIRE_STREAM_NS
wire.WIRE_FLOW_OPEN
wire.WIRE_FLOW_DROPPED
wire.WIRE_FLOW_ENDED
wire.WIRE_FLOW_DONE
# record fields: a finding's facts, read by whoever inspects the verdict
stateful.FanoutVerdict.worst_destination
stateful.FanoutVerdict.worst_ports
# the NVML poll's own figures (sensors/nvml.py), kept for its health metrics
nvml.NvmlSensor.polls_total
nvml.NvmlSensor.last_poll_seconds
nvml._Device.compute_call
nvml._Device.graphics_call
nvml._Device.mps_call
# gRPC servicer methods, called by name by grpc (the fake kubelet's Lister)
kubelet.FakeKubelet.List
kubelet.FakeKubelet.GetAllocatableResources
# read by child-process scripts that tests and benches run as strings
nvml.NvmlSensor.unavailable_reason
nvml.NvmlSensor.error_counts
# the gpu.trust choices; config.py spells them itself (it imports nothing of gpu/)
allocations.TRUST_CHOICES
# merged before their readers: each owner wires it or deletes it, then drops it here
# (i16: the wire's stream cuts and evictions as metrics; i17a: Response.acts)
wire_sensor.WireSensor.stream_cuts
wire_handler.WireHandler.evicted
responses.Response.acts
