import time

import pytest

from hvkit.devices.exit_port import ExitPort
from hvkit.devices.i8042 import I8042
from hvkit.devices.rtc import CmosRtc


def test_exit_port_reports_code():
    codes = []
    port = ExitPort(codes.append)
    port.write(0, (300).to_bytes(4, "little"))
    assert codes == [300]


def test_i8042_answers_linux_probe_commands():
    kbd = I8042(lambda: None)
    kbd.write(4, b"\x20")
    assert kbd.read(4, 1)[0] & 0x01 and kbd.read(0, 1) == b"\x20"   # config, AUX off
    kbd.write(4, b"\x60")
    kbd.write(0, b"\x47")
    kbd.write(4, b"\x20")
    assert kbd.read(0, 1) == b"\x47"
    kbd.write(4, b"\xd3")
    kbd.write(0, b"\x5a")                   # AUX loopback comes back as AUX data
    assert kbd.read(4, 1)[0] & 0x21 == 0x21
    assert kbd.read(0, 1) == b"\x5a"
    assert not kbd.read(4, 1)[0] & 0x01     # nothing left: no spinning on stale data
    assert kbd.read(4, 1)[0] & 0x10         # keyboard not inhibited


def test_i8042_output_port_reset():
    resets = []
    kbd = I8042(lambda: resets.append(1))
    kbd.write(4, b"\xd1")
    kbd.write(0, b"\xfe")                   # bit 0 low: reset
    assert resets == [1]


def test_i8042_reset_line():
    resets = []
    kbd = I8042(lambda: resets.append(1))
    assert kbd.read(4, 1)[0] & 0x04          # system flag set
    kbd.write(4, b"\xaa")                    # self test
    assert kbd.read(4, 1)[0] & 0x01
    assert kbd.read(0, 1) == b"\x55"
    kbd.write(4, b"\xfe")
    assert resets == [1] and kbd.resets == 1


def rtc_read(rtc, reg):
    rtc.write(0, bytes([reg]))
    return rtc.read(1, 1)[0]


def test_rtc_reports_host_time_in_bcd_24h():
    t = time.mktime((2026, 11, 24, 13, 45, 30, 0, 0, 0)) - time.timezone
    rtc = CmosRtc(clock=lambda: t)
    assert rtc_read(rtc, 0x00) == 0x30
    assert rtc_read(rtc, 0x02) == 0x45
    assert rtc_read(rtc, 0x04) == 0x13
    assert rtc_read(rtc, 0x07) == 0x24
    assert rtc_read(rtc, 0x08) == 0x11
    assert rtc_read(rtc, 0x09) == 0x26
    assert rtc_read(rtc, 0x32) == 0x20
    assert rtc_read(rtc, 0x0D) & 0x80         # valid RAM and time
    assert not rtc_read(rtc, 0x0A) & 0x80     # not updating


def test_rtc_binary_and_12h_modes():
    t = time.mktime((2026, 1, 2, 15, 4, 5, 0, 0, 0)) - time.timezone
    rtc = CmosRtc(clock=lambda: t)
    rtc.write(0, b"\x0b")
    rtc.write(1, bytes([0x04]))               # binary, 12-hour
    assert rtc_read(rtc, 0x00) == 5
    assert rtc_read(rtc, 0x04) == 0x80 | 3    # 3 PM


def test_rtc_cmos_ram_and_readonly_status():
    rtc = CmosRtc()
    rtc.write(0, b"\x40")
    rtc.write(1, b"\x99")
    assert rtc_read(rtc, 0x40) == 0x99
    rtc.write(0, b"\x0d")
    rtc.write(1, b"\x00")
    assert rtc_read(rtc, 0x0D) == 0x80
    rtc.write(0, b"\x8f")                     # NMI-disable bit is not part of the index
    assert rtc.index == 0x0F and rtc.nmi_disabled


@pytest.mark.parametrize("reg", range(0, 128, 7))
def test_rtc_any_register_reads_one_byte(reg):
    rtc = CmosRtc()
    rtc.write(0, bytes([reg]))
    assert len(rtc.read(1, 1)) == 1
