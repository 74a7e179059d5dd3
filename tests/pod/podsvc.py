#!/usr/bin/env python3
"""Fake in-pod services for the kmirror end-to-end tests.

Started by the Rust harness (tests/support/pod.rs) inside a pod network
namespace.  One process serves everything a test needs to tell "the pod
answered" apart from "the host answered":

* DNS on --dns-ip:53 (UDP and TCP) for a tiny cluster.local zone, logging
  every query so tests can prove a lookup really reached the pod's server;
* HTTP/1.1 on port 8080 of every pod address, echoing the path and the pod index (GET,
  HEAD, POST and PUT; request bodies are read and ignored);
* a TCP line echo on --service-ip:7777, a UDP echo on --service-ip:7778 (both also on
  --service-ip6, the pod-only IPv6 address, when given), a TCP byte source
  on --service-ip:7779 (writes as many bytes as its first line asks for) and a TCP byte echo
  on --service-ip:7780 (returns every byte unchanged, for bulk-integrity tests);
* a stalled TCP listener on --service-ip:7781 whose accept queue is kept full, so the kernel
  drops every new SYN and a connect to it stays in SYN-SENT (for connect-timeout tests);
* a UDP size echo on port 7782 of every IPv6 address (answers ``size=<bytes received>``, so
  datagrams up to IPv6's largest can be checked);
* a UDP service on --service-ip:7783 that answers ``pod-other <data>`` from another port (a
  new socket per datagram), as TFTP and some DNS and STUN servers do.

Port 1 on the service IP is deliberately left closed (connection refused).
Only the standard library is used.  Prints ``ready`` once every socket is
bound; exits promptly on SIGTERM/SIGINT or when its parent goes away.
"""

import argparse
import http.server
import os
import resource
import signal
import socket
import socketserver
import struct
import sys
import threading
import time

TTL = 30
QTYPE_NAMES = {
    1: "A",
    2: "NS",
    5: "CNAME",
    6: "SOA",
    12: "PTR",
    15: "MX",
    16: "TXT",
    28: "AAAA",
    33: "SRV",
    41: "OPT",
    65: "HTTPS",
    255: "ANY",
}
TYPE_A = 1
TYPE_OPT = 41
RCODE_FORMERR = 1
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
# UDP payload size we advertise in our own OPT record (RFC 6891).
OUR_EDNS_SIZE = 1232


def log(msg):
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


class DnsError(Exception):
    """A query too malformed to answer with anything but FORMERR."""


class Zone:
    """The fixed zone: name -> list of IPv4 addresses for A queries."""

    def __init__(self, index, service_ip):
        self.records = {
            "echo.default.svc.cluster.local": [service_ip],
            "kubernetes.default.svc.cluster.local": [service_ip],
            "big.default.svc.cluster.local": [
                "10.213.%d.%d" % (index, host) for host in range(100, 140)
            ],
        }

    def lookup(self, name):
        """Returns None for NXDOMAIN, else the A addresses (maybe empty)."""
        return self.records.get(name.lower().rstrip("."))


class DnsLog:
    """Thread-safe record of every query received, in arrival order."""

    def __init__(self):
        self.lock = threading.Lock()
        self.lines = []

    def add(self, qtype, name):
        qname = QTYPE_NAMES.get(qtype, "TYPE%d" % qtype)
        with self.lock:
            self.lines.append("%s %s" % (qname, name.lower().rstrip(".")))

    def text(self):
        with self.lock:
            return "".join(line + "\n" for line in self.lines)


def read_name(msg, offset):
    """Decodes a (possibly compressed) domain name; returns (name, next_offset)."""
    labels = []
    next_offset = None
    jumps = 0
    while True:
        if offset >= len(msg):
            raise DnsError("name runs past end of message")
        length = msg[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(msg):
                raise DnsError("truncated compression pointer")
            jumps += 1
            if jumps > 32:
                raise DnsError("compression loop")
            if next_offset is None:
                next_offset = offset + 2
            offset = ((length & 0x3F) << 8) | msg[offset + 1]
            continue
        if length & 0xC0:
            raise DnsError("unsupported label type")
        offset += 1
        if length == 0:
            break
        if offset + length > len(msg):
            raise DnsError("label runs past end of message")
        labels.append(msg[offset : offset + length].decode("ascii", "replace"))
        offset += length
    if next_offset is None:
        next_offset = offset
    return ".".join(labels), next_offset


def skip_rr(msg, offset):
    """Skips one resource record; returns (rtype, rclass, next_offset)."""
    _, offset = read_name(msg, offset)
    if offset + 10 > len(msg):
        raise DnsError("truncated resource record")
    rtype, rclass, _ttl, rdlen = struct.unpack_from("!HHIH", msg, offset)
    offset += 10 + rdlen
    if offset > len(msg):
        raise DnsError("truncated rdata")
    return rtype, rclass, offset


def handle_query(msg, zone, dns_log, udp):
    """Builds the response bytes for one query, or None to stay silent."""
    if len(msg) < 12:
        return None
    qid, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!6H", msg, 0)
    if flags & 0x8000:
        return None  # a response, not a query: never answer those
    opcode = (flags >> 11) & 0xF
    rd = flags & 0x0100

    def header(rcode, an, tc=0, qd=1, ar=0):
        out_flags = 0x8000 | (opcode << 11) | 0x0400 | rd | 0x0080 | rcode
        if tc:
            out_flags |= 0x0200
        return struct.pack("!6H", qid, out_flags, qd, an, 0, ar)

    try:
        if qdcount != 1:
            raise DnsError("expected exactly one question")
        name, qend = read_name(msg, 12)
        if qend + 4 > len(msg):
            raise DnsError("truncated question")
        qtype, qclass = struct.unpack_from("!HH", msg, qend)
        question = msg[12 : qend + 4]
        # Look for an EDNS OPT record (which raises the UDP size limit).
        edns_size = None
        offset = qend + 4
        for section_index in range(ancount + nscount + arcount):
            rtype, rclass, offset = skip_rr(msg, offset)
            if section_index >= ancount + nscount and rtype == TYPE_OPT:
                edns_size = max(512, rclass)
    except DnsError as err:
        log("dns: FORMERR: %s" % err)
        return header(RCODE_FORMERR, 0, qd=0)

    dns_log.add(qtype, name)
    log("dns %s: %s %s" % ("udp" if udp else "tcp", QTYPE_NAMES.get(qtype, qtype), name))

    opt = b""
    if edns_size is not None:
        # Root name, type OPT, our payload size, ext-rcode/version/flags 0.
        opt = b"\x00" + struct.pack("!HHIH", TYPE_OPT, OUR_EDNS_SIZE, 0, 0)
    arcount_out = 1 if opt else 0

    if opcode != 0:
        return header(RCODE_NOTIMP, 0, ar=arcount_out) + question + opt

    addresses = zone.lookup(name)
    if addresses is None:
        return header(RCODE_NXDOMAIN, 0, ar=arcount_out) + question + opt
    answers = []
    if qtype == TYPE_A and qclass in (1, 255):
        for address in addresses:
            # 0xC00C: compression pointer to the question name at offset 12.
            answers.append(
                struct.pack("!HHHIH", 0xC00C, TYPE_A, 1, TTL, 4)
                + socket.inet_aton(address)
            )
    response = header(0, len(answers), ar=arcount_out) + question + b"".join(answers) + opt
    limit = edns_size if edns_size is not None else 512
    if udp and len(response) > limit:
        return header(0, 0, tc=1, ar=arcount_out) + question + opt
    return response


def serve_dns_udp(sock, zone, dns_log):
    while True:
        try:
            msg, peer = sock.recvfrom(65535)
        except OSError:
            return
        try:
            response = handle_query(msg, zone, dns_log, udp=True)
            if response is not None:
                sock.sendto(response, peer)
        except Exception as err:  # keep serving whatever one query does
            log("dns udp error from %s: %r" % (peer, err))


def recv_exact(conn, count):
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve_dns_tcp_conn(conn, zone, dns_log):
    with conn:
        conn.settimeout(30)
        try:
            while True:
                prefix = recv_exact(conn, 2)
                if prefix is None:
                    return
                (length,) = struct.unpack("!H", prefix)
                msg = recv_exact(conn, length)
                if msg is None:
                    return
                response = handle_query(msg, zone, dns_log, udp=False)
                if response is None:
                    return
                conn.sendall(struct.pack("!H", len(response)) + response)
        except (OSError, socket.timeout):
            return


def serve_dns_tcp(listener, zone, dns_log):
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(
            target=serve_dns_tcp_conn, args=(conn, zone, dns_log), daemon=True
        ).start()


def make_http_handler(index, dns_log):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "kmirror-podsvc"
        sys_version = ""

        def _respond(self, send_body):
            path = self.path.split("?", 1)[0]
            if path == "/dns-log":
                body = dns_log.text().encode()
            else:
                body = ("pod-echo %d %s\n" % (index, self.path)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Pod", str(index))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def do_GET(self):
            self._respond(True)

        def do_POST(self):
            # Read the body so keep-alive framing stays right; the answer names the path only.
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 65536))
                if not chunk:
                    break
                remaining -= len(chunk)
            self._respond(True)

        do_PUT = do_POST

        def do_HEAD(self):
            self._respond(False)

        def log_request(self, code="-", size="-"):
            log(
                "http %s %s from %s:%d -> %s"
                % (
                    # Unset when the request line itself was refused (e.g. an HTTP/2 preface).
                    getattr(self, "command", None),
                    getattr(self, "path", "-"),
                    self.client_address[0],
                    self.client_address[1],
                    code,
                )
            )

        def log_message(self, fmt, *args):
            log("http: " + (fmt % args))

    return Handler


class HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Load tests open hundreds of connections at once; the default backlog of 5 would drop SYNs.
    request_queue_size = 1024

    # Dual-stack: the pod's IPv4 and IPv6 addresses on one socket.
    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # HTTPServer.server_bind would call socket.getfqdn(), i.e. a reverse
        # DNS lookup through the HOST's resolv.conf from inside the pod netns:
        # slow (timeouts) and traffic we never want. Skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = host
        self.server_port = port


def make_line_echo_handler(index):
    prefix = ("pod-echo %d: " % index).encode()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            log("tcp-echo connection from %s:%d" % self.client_address[:2])
            try:
                for line in self.rfile:
                    if line.endswith(b"\n"):
                        line = line[:-1]
                        if line.endswith(b"\r"):
                            line = line[:-1]
                    self.wfile.write(prefix + line + b"\n")
                    self.wfile.flush()
            except OSError:
                pass

    return Handler


class LineEchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


class LineEcho6Server(LineEchoServer):
    address_family = socket.AF_INET6


def serve_udp_echo(sock, index):
    prefix = ("pod-udp %d: " % index).encode()
    while True:
        try:
            data, peer = sock.recvfrom(65535)
            sock.sendto(prefix + data, peer)
        except OSError:
            return


def serve_udp_size_echo(sock):
    while True:
        try:
            data, peer = sock.recvfrom(65535)
            sock.sendto(b"size=%d" % len(data), peer)
        except OSError:
            return


def serve_udp_other_port(sock, service_ip):
    while True:
        try:
            data, peer = sock.recvfrom(65535)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                other.bind((service_ip, 0))
                other.sendto(b"pod-other " + data, peer)
        except OSError:
            return


def watch_parent(initial_ppid):
    """Exits when the harness that started us dies (we get re-parented)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != initial_ppid:
            os._exit(0)


def make_source_handler():
    """Writes as many bytes as the client's first line asks for, as fast as it can, then closes:
    a fast pod-side writer for flow-control tests."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            try:
                count = int(self.rfile.readline().strip() or 0)
            except ValueError:
                return
            block = bytes(range(256)) * 4096  # 1 MiB
            while count > 0:
                chunk = block[: min(count, len(block))]
                try:
                    self.wfile.write(chunk)
                except OSError:
                    return
                count -= len(chunk)

    return Handler


def make_byte_echo_handler():
    """Returns every byte as it arrives, in both directions at full speed."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            try:
                while True:
                    data = self.request.recv(1 << 20)
                    if not data:
                        break
                    self.request.sendall(data)
                self.request.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    return Handler


def stalled_listener(address):
    """A listener that never accepts, its one-slot queue filled by our own connection.

    Returns every socket involved; they must stay referenced to stay open."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(address)
    listener.listen(0)
    # listen(0) queues one connection: once it holds ours, the kernel drops every new SYN.
    filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    filler.connect(address)
    return [listener, filler]


def start_thread(target, *args):
    threading.Thread(target=target, args=args, daemon=True).start()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--service-ip", required=True)
    parser.add_argument("--service-ip6")
    parser.add_argument("--dns-ip", required=True)
    args = parser.parse_args()

    # Exit at once (no cleanup needed: the kernel closes the sockets).
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))

    # Load tests hold a thousand connections open at once.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    zone = Zone(args.index, args.service_ip)
    dns_log = DnsLog()

    dns_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns_udp.bind((args.dns_ip, 53))
    dns_tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dns_tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    dns_tcp.bind((args.dns_ip, 53))
    dns_tcp.listen(64)
    # On every address: the pod's clients reach it on the pod IP (the veth), which is where
    # kmirror's incoming-traffic classifier sits; the service IP on lo stays pod-only.
    http_server = HttpServer(("::", 8080), make_http_handler(args.index, dns_log))
    echo_server = LineEchoServer((args.service_ip, 7777), make_line_echo_handler(args.index))
    udp_echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_echo.bind((args.service_ip, 7778))
    source_server = LineEchoServer((args.service_ip, 7779), make_source_handler())
    byte_echo_server = LineEchoServer((args.service_ip, 7780), make_byte_echo_handler())
    stalled = stalled_listener((args.service_ip, 7781))
    udp_size_echo = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp_size_echo.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    udp_size_echo.bind(("::", 7782))
    udp_other_port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_other_port.bind((args.service_ip, 7783))
    if args.service_ip6:
        echo6_server = LineEcho6Server((args.service_ip6, 7777), make_line_echo_handler(args.index))
        udp_echo6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        udp_echo6.bind((args.service_ip6, 7778))
        start_thread(echo6_server.serve_forever)
        start_thread(serve_udp_echo, udp_echo6, args.index)

    start_thread(serve_dns_udp, dns_udp, zone, dns_log)
    start_thread(serve_dns_tcp, dns_tcp, zone, dns_log)
    start_thread(http_server.serve_forever)
    start_thread(echo_server.serve_forever)
    start_thread(serve_udp_echo, udp_echo, args.index)
    start_thread(source_server.serve_forever)
    start_thread(byte_echo_server.serve_forever)
    start_thread(serve_udp_size_echo, udp_size_echo)
    start_thread(serve_udp_other_port, udp_other_port, args.service_ip)
    start_thread(watch_parent, os.getppid())

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    log("podsvc %d ready: service %s, dns %s" % (args.index, args.service_ip, args.dns_ip))
    while stalled:
        signal.pause()


if __name__ == "__main__":
    main()
