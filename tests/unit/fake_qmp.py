"""A fake QEMU monitor for unit tests, in the style of community.docker's fake API: a table of handlers, one per
command, that answer from a model of what QEMU holds and change it as QEMU would.

The model: block devices and nodes with their dirty bitmaps, fdsets and named descriptors, the NBD server and its
exports, user-creatable objects and the run state. Where the code under test relies on QEMU refusing something (a
node still in use, a busy bitmap, a second NBD server, a removed fdset that lingers while the VM does not run), the
fake refuses it too, with QEMU's error class and words. Every command is recorded in `commands`, with the run state
it ran in. fail() makes a chosen call fail, to test rollbacks. A command, option or QOM path the model does not know
fails the test (AssertionError): the fake never guesses.

Descriptors handed over (add-fd, getfd) are duplicated and held as QEMU holds them, so that "/proc/self/fd/N" of an
add-fd answer can be read, and a listener handed to the NBD server is still served after the caller closed its own.

`answers` gives canned answers instead, for tests of one function against fixed replies.
"""

import copy
import os
import socket
import stat
from urllib.parse import parse_qs, unquote, urlsplit

from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.client import QmpCommandError, QmpError

DISK_SIZE = 64 << 20
NO_UUID = "00000000-0000-0000-0000-000000000000"
CHILD_ROLES = ("file", "backing", "target")
COMMON_OPTIONS = {"driver", "node-name", "discard", "read-only", "auto-read-only", "cache", "detect-zeroes"}
DRIVER_OPTIONS = {
    "file": {"filename"},
    "raw": {"file", "size", "offset"},
    "qcow2": {"file", "backing"},
    "copy-before-write": {"file", "target", "bitmap", "on-cbw-error", "cbw-timeout"},
    "snapshot-access": {"file"},
}
# Filters report their child's image as their backing image in query-block, as QEMU does.
FILTER_DRIVERS = ("copy-before-write",)
# The copy-before-write options QEMU 7.1 added: where they are missing, QEMU cannot fleece safely.
BREAK_SNAPSHOT_OPTIONS = ("on-cbw-error", "cbw-timeout")


def named_node(node, drv="qcow2", bitmaps=(), filename=None, size=1 << 30, ro=False):
    """A node as query-named-block-nodes (and query-block's "inserted") describes it."""
    filename = filename or "/img/%s" % node
    return {"node-name": node, "drv": drv, "ro": ro, "file": filename,
            "image": {"virtual-size": size, "filename": filename, "format": drv}, "dirty-bitmaps": list(bitmaps)}


def block_device(qdev, node, drv="qcow2", size=1 << 30, ro=False, device="", filename=None):
    return {"device": device, "qdev": qdev, "inserted": named_node(node, drv, filename=filename, size=size, ro=ro)}


def bitmap(name, count=0, granularity=65536, inconsistent=False, persistent=True, recording=True):
    info = {"name": name, "count": count, "granularity": granularity, "recording": recording,
            "persistent": persistent, "busy": False}
    if inconsistent:
        info["inconsistent"] = True
    return info


def qmp_schema(cbw_members, drivers):
    """Just what check_fleecing_support reads of query-qmp-schema: the members of an object, the values of an enum."""
    return [{"name": "1", "meta-type": "object", "members": [{"name": m, "type": "str"} for m in cbw_members]},
            {"name": "2", "meta-type": "enum", "values": list(drivers)}]


def image_file(name):
    """The image file of the disk that add_disk makes."""
    return "/img/%s.qcow2" % name


def qdev_path(name):
    """The qdev path of a virtio-blk device -device ...,id=name."""
    return "/machine/peripheral/%s/virtio-backend" % name


def qmp_error(desc, error_class="GenericError"):
    """A QMP error as a handler raises it: execute() names the command."""
    return QmpCommandError(None, error_class, desc)


class Node:
    """A block node: its driver, its options as blockdev-add got them, its children by role, its bitmaps."""

    def __init__(self, name, driver, options, children, size, filename):
        self.name = name
        self.driver = driver
        self.options = options
        self.children = children  # {role: node name}
        self.size = size
        self.filename = filename
        self.implicit = False  # made from inline options: it goes with its parent
        self.bitmaps = {}
        self.fdset = None  # the fdset whose file this node opened
        self.fd = None  # its own duplicate of that file, as QEMU's dup of the fdset's
        self.broken = False  # copy-before-write: the snapshot broke

    def info(self, nodes, flat=True):
        entry = named_node(self.name, self.driver, [dict(b) for b in self.bitmaps.values()], self.filename,
                           self.size, bool(self.options.get("read-only")))
        below = self.children.get("file" if self.driver in FILTER_DRIVERS else "backing")
        if not flat and below:
            entry["image"]["backing-image"] = nodes[below].info(nodes, flat=False)["image"]
        return entry


class Device:
    """A block device: its qdev path, the node it is attached to; anonymous (-device with a -blockdev drive)."""

    def __init__(self, qdev, node):
        self.qdev = qdev
        self.node = node


class FakeQmp:
    """A QEMU monitor; the same interface as QmpClient."""

    def __init__(self, answers=None, status="running", socket_path="/nonexistent/qmp.sock", version=(7, 2, 0)):
        self.answers = answers or {}
        self.commands = []  # (command, arguments)
        self.statuses = []  # the run state each command ran in
        self.status = status
        self.socket_path = socket_path
        self.version = version
        self.nodes = {}
        self.devices = []
        self.images = {}  # disk name: its image node, below any filter
        self.fdsets = {}  # id: [{"fd": held fd, "opaque": str, "removed": bool}]
        self.named_fds = {}  # fdname: held fd
        self.nbd_server = None  # {"listener": socket, "address", "tls-creds", "tls-authz"}
        self.exports = {}  # id: block-export-add's arguments
        self.objects = {}  # id: object-add's arguments, and "loaded": what a tls-creds object read
        self.chardevs = []
        self.events = []
        self.probe_reads = []
        self._next_block = 100
        self._received_fd = None
        self._failures = {}
        self.handlers = {
            "query-status": lambda a: {"status": self.status, "running": self.status == "running"},
            "stop": lambda a: self._set_status("paused"),
            "cont": lambda a: self._set_status("running"),
            "query-name": lambda a: {},  # started without -name
            "query-uuid": lambda a: {"UUID": NO_UUID},
            "query-version": lambda a: {"qemu": dict(zip(("major", "minor", "micro"), self.version)), "package": ""},
            "query-qmp-schema": self._schema,
            "query-chardev": lambda a: self.chardevs,
            "query-block": self._query_block,
            "query-named-block-nodes": self._query_nodes,
            "blockdev-add": self._blockdev_add,
            "blockdev-del": self._blockdev_del,
            "qom-set": self._qom_set,
            "qom-list": self._qom_list,
            "add-fd": self._add_fd,
            "remove-fd": self._remove_fd,
            "query-fdsets": self._query_fdsets,
            "getfd": self._getfd,
            "closefd": self._closefd,
            "nbd-server-start": self._nbd_server_start,
            "nbd-server-stop": self._nbd_server_stop,
            "block-export-add": self._block_export_add,
            "block-export-del": self._block_export_del,
            "query-block-exports": lambda a: [{"type": e["type"], "id": e["id"], "node-name": e["node-name"],
                                               "shutting-down": False} for e in self.exports.values()],
            "block-dirty-bitmap-add": self._bitmap_add,
            "block-dirty-bitmap-merge": self._bitmap_merge,
            "block-dirty-bitmap-remove": self._bitmap_remove,
            "transaction": self._transaction,
            "object-add": self._object_add,
            "object-del": self._object_del,
        }

    @classmethod
    def with_disks(cls, *names, **kwargs):
        """A running VM with a writable qcow2 virtio disk of each name."""
        fake = cls(**kwargs)
        for name in names:
            fake.add_disk(name)
        return fake

    # --- the VM as it was started -------------------------------------------------------------------------------

    def add_disk(self, name):
        """A qcow2 disk as -blockdev (a file node, a format node on it) and -device virtio-blk,id=name make it."""
        filename = image_file(name)
        protocol = Node(name + "-file", "file", {"filename": filename}, {}, DISK_SIZE, filename)
        image = Node(name + "-qcow2", "qcow2", {}, {"file": protocol.name}, DISK_SIZE, filename)
        self.nodes.update({protocol.name: protocol, image.name: image})
        self.devices.append(Device(qdev_path(name), image.name))
        self.images[name] = image.name
        return image.name

    def add_checkpoint(self, disk, name, dirty=0, granularity=65536, persistent=True):
        """A bitmap on the image of `disk`, with `dirty` bytes written since it was made."""
        self.nodes[self.images[disk]].bitmaps[name] = bitmap(name, dirty, granularity, persistent=persistent)

    # --- the client's interface ---------------------------------------------------------------------------------

    def connect(self):
        pass

    def close(self):
        """The monitor client leaves; QEMU keeps what it holds."""

    def execute(self, command, arguments=None, timeout=None):
        self.commands.append((command, copy.deepcopy(arguments)))
        self.statuses.append(self.status)
        if command in self.answers:
            answer = self.answers[command]
            return answer(arguments) if callable(answer) else answer
        assert command in self.handlers, "the fake QEMU has no model of %s" % command
        failure = self._failure(command)
        if failure is not None and not failure["applied"]:
            raise failure["error"]
        try:
            answer = copy.deepcopy(self.handlers[command](arguments or {}))
        except QmpCommandError as err:
            raise QmpCommandError(command, err.error_class, err.desc) from None
        if failure is not None:
            raise failure["error"]
        return answer

    def _failure(self, command):
        """The failure armed for this call of command, if it is one of those that fail."""
        failure = self._failures.get(command)
        if failure is None:
            return None
        failure["calls"] += 1
        return failure if failure["first"] <= failure["calls"] < failure["first"] + failure["times"] else None

    def execute_with_fd(self, fd, command, arguments):
        assert command in ("add-fd", "getfd"), "QEMU takes a descriptor only with add-fd and getfd"
        self._received_fd = fd
        try:
            return self.execute(command, arguments)
        finally:
            self._received_fd = None

    def transaction(self, actions):
        return self.execute("transaction", {"actions": [{"type": kind, "data": data} for kind, data in actions]})

    def wait_event(self, names, timeout=None, **match):
        names = (names,) if isinstance(names, str) else tuple(names)
        for event in self.events:
            if event["event"] in names and all(event["data"].get(k) == v for k, v in match.items()):
                self.events.remove(event)
                return event
        raise QmpError("QEMU did not send %s for %s within %ss." % (" or ".join(names), match, timeout))

    def peer_pid(self):
        return os.getpid()

    def peer_file_uid(self):
        return os.geteuid()

    # --- for the tests ------------------------------------------------------------------------------------------

    def fail(self, command, nth=1, times=1, error=None, applied=False):
        """Make the nth call of command from now on (and times-1 more) fail with error, a QMP GenericError by default;
        applied: QEMU did it all the same (an answer that came too late, a build that reports an error yet acts)."""
        self._failures[command] = dict(first=nth, times=times, calls=0, applied=applied,
                                       error=error or QmpCommandError(command, "GenericError", "injected failure"))

    def ran_while_paused(self):
        return [command for command, status in zip(self.commands, self.statuses) if status != "running"]

    def attached(self, name):
        """The node that the virtio disk `name` is attached to."""
        return self.nodes[self._device(qdev_path(name)).node]

    def break_snapshot(self, name):
        """The guest overwrote what the scratch of disk `name` could not keep: its filter broke the snapshot."""
        node = self.attached(name)
        assert node.driver == "copy-before-write", "disk %s has no copy-before-write filter" % name
        node.broken = True

    def read_probe(self, url):
        """What view_intact(url) finds: whether a plain NBD read of the export at nbd+unix:///NAME?socket=PATH works.

        It works on an export of a snapshot-access node whose copy-before-write filter kept its snapshot, served by
        this QEMU's NBD server without TLS on that socket.
        """
        self.probe_reads.append(url)
        parts = urlsplit(url)
        server = self.nbd_server
        if server is None or server["address"] != parse_qs(parts.query)["socket"][0] or server["tls-creds"]:
            return False
        for export in self.exports.values():
            if export["name"] == unquote(parts.path[1:]):
                node = self.nodes[export["node-name"]]
                return node.driver == "snapshot-access" and not self.nodes[node.children["file"]].broken
        return False

    def state(self):
        """Everything this QEMU holds, as plain data: two equal states are the same QEMU to a client."""
        return copy.deepcopy(dict(
            status=self.status,
            devices={device.qdev: device.node for device in self.devices},
            nodes={node.name: dict(driver=node.driver, children=node.children, bitmaps=node.bitmaps)
                   for node in self.nodes.values()},
            fdsets=self._query_fdsets({}), named_fds=sorted(self.named_fds),
            nbd_server=self.nbd_server and {k: v for k, v in self.nbd_server.items() if k != "listener"},
            exports=self.exports, objects={name: entry["qom-type"] for name, entry in self.objects.items()},
            descriptors=self.descriptors()))

    def descriptors(self):
        """How many descriptors this QEMU holds: scratch images, listeners, directories."""
        return (sum(len(fds) for fds in self.fdsets.values()) + len(self.named_fds) + bool(self.nbd_server)
                + sum(node.fd is not None for node in self.nodes.values()))

    def shut_down(self):
        """QEMU exits: every descriptor it held is closed."""
        for fds in self.fdsets.values():
            for entry in fds:
                os.close(entry["fd"])
        for fd in list(self.named_fds.values()) + [n.fd for n in self.nodes.values() if n.fd is not None]:
            os.close(fd)
        if self.nbd_server:
            self.nbd_server["listener"].close()
        self.fdsets, self.named_fds, self.nbd_server, self.nodes = {}, {}, None, {}

    # --- the run state, the schema, the block layer --------------------------------------------------------------

    def _set_status(self, status):
        self.status = status
        if status == "running":
            for fdset_id in list(self.fdsets):
                self._clean_fdset(fdset_id)
        return {}

    def _schema(self, _arguments):
        members = ("file", "target", "bitmap") + (BREAK_SNAPSHOT_OPTIONS if self.version >= (7, 1) else ())
        drivers = sorted(d for d in DRIVER_OPTIONS if self.version >= (7, 1) or d != "snapshot-access")
        return qmp_schema(members, drivers)

    def _query_block(self, _arguments):
        answer = []
        for device in self.devices:
            answer.append({"device": "", "qdev": device.qdev, "locked": False, "removable": False,
                           "inserted": self.nodes[device.node].info(self.nodes, flat=False)})
        return answer

    def _query_nodes(self, arguments):
        assert arguments.get("flat") is True, "without flat, QEMU nests the nodes' backing chains"
        return [node.info(self.nodes) for node in self.nodes.values()]

    def _node(self, name):
        if name not in self.nodes:
            raise qmp_error("Cannot find device='' nor node-name='%s'" % name)
        return self.nodes[name]

    def _device(self, qdev):
        for device in self.devices:
            if device.qdev == qdev:
                return device
        raise qmp_error("Device '%s' not found" % qdev, "DeviceNotFound")

    def _blockdev_add(self, arguments):
        if not arguments.get("node-name"):
            raise qmp_error("'node-name' must be specified for the root node")
        made = {}
        self._new_nodes(arguments, made)
        for node in made.values():
            if node.fdset is not None:
                node.fd = os.dup(self.fdsets[node.fdset][0]["fd"])
            self.nodes[node.name] = node
        return {}

    def _new_nodes(self, options, made):
        """The node that options make, checked as QEMU checks them; it and its inline children go into made
        ({name: node}), not yet into the model."""
        driver = options.get("driver")
        assert driver in DRIVER_OPTIONS, "the fake QEMU has no model of driver %s" % driver
        if self.version < (7, 1) and (driver == "snapshot-access" or set(BREAK_SNAPSHOT_OPTIONS) & set(options)):
            raise qmp_error("Parameter 'driver' does not accept value '%s'" % driver if driver == "snapshot-access"
                            else "Parameter 'on-cbw-error' is unexpected")
        unexpected = set(options) - COMMON_OPTIONS - DRIVER_OPTIONS[driver]
        assert not unexpected, "blockdev-add of %s with options the fake does not know: %s" % (driver, unexpected)
        name = options.get("node-name")
        if not name:
            name = "#block%d" % self._next_block
            self._next_block += 1
        if name in self.nodes or name in made:
            raise qmp_error("Duplicate nodes with node-name='%s'" % name)
        children = {}
        for role in CHILD_ROLES:
            child = options.get(role)
            if isinstance(child, dict):
                children[role] = self._new_nodes(child, made).name
            elif child is not None:
                children[role] = self._node(child).name
        known = dict(self.nodes, **made)
        if driver == "file":
            node = self._file_node(name, options)
        else:
            assert "file" in children, "%s needs a file child" % driver
            shown = known[children.get("backing", children["file"])]  # the node whose size it shows
            size = options.get("size", shown.size) if driver == "raw" else shown.size
            node = Node(name, driver, options, children, size, known[children["file"]].filename)
        if driver == "copy-before-write" and "target" not in children:
            raise qmp_error("Parameter 'target' is missing")
        if driver == "snapshot-access" and known[children["file"]].driver != "copy-before-write":
            raise qmp_error("snapshot-access needs a copy-before-write filter as its file")
        node.implicit = not options.get("node-name")
        made[name] = node
        return node

    def _file_node(self, name, options):
        filename = options["filename"]
        size, fdset_id = 0, None
        if filename.startswith("/dev/fdset/"):
            fdset_id = int(filename[len("/dev/fdset/"):])
            fds = [entry for entry in self.fdsets.get(fdset_id, []) if not entry["removed"]]
            if not fds:
                raise qmp_error("Could not open '%s': No such file or directory" % filename)
            size = os.fstat(fds[0]["fd"]).st_size
        node = Node(name, "file", options, {}, size, filename)
        node.fdset = fdset_id
        return node

    def _users(self, node):
        users = ["device %s" % d.qdev for d in self.devices if d.node == node.name]
        users += ["node %s" % n.name for n in self.nodes.values() if node.name in n.children.values()]
        return users + ["export %s" % e["id"] for e in self.exports.values() if e["node-name"] == node.name]

    def _blockdev_del(self, arguments):
        name = arguments["node-name"]
        if name not in self.nodes:
            raise qmp_error("Failed to find node with node-name='%s'" % name)
        node = self.nodes[name]
        if node.implicit:
            raise qmp_error("Node %s is not owned by the monitor" % name)
        users = self._users(node)
        if users:
            raise qmp_error("Node '%s' is busy: it is used by %s" % (name, ", ".join(users)))
        self._delete_node(node)
        return {}

    def _delete_node(self, node):
        del self.nodes[node.name]
        if node.fd is not None:
            os.close(node.fd)
        if node.fdset is not None:
            self._clean_fdset(node.fdset)
        for child in node.children.values():
            if self.nodes[child].implicit and not self._users(self.nodes[child]):
                self._delete_node(self.nodes[child])

    def _qom_set(self, arguments):
        assert arguments["property"] == "drive", "the fake QEMU models only a device's drive property"
        device = self._device(arguments["path"])
        if arguments["value"] not in self.nodes:
            raise qmp_error("Property 'virtio-blk-device.drive' can't find value '%s'" % arguments["value"])
        assert device.node != arguments["value"], "QEMU 7.2 aborts on a qom-set of the drive a device has"
        device.node = arguments["value"]
        return {}

    # --- descriptors --------------------------------------------------------------------------------------------

    def _take_fd(self):
        if self._received_fd is None:
            raise qmp_error("No file descriptor supplied via SCM_RIGHTS")
        return os.dup(self._received_fd)

    def _add_fd(self, arguments):
        assert "fdset-id" not in arguments, "the fake QEMU models only new fdsets"
        fdset_id = min(set(range(len(self.fdsets) + 1)) - set(self.fdsets))  # QEMU takes the lowest free id
        fd = self._take_fd()
        self.fdsets[fdset_id] = [dict(fd=fd, opaque=arguments.get("opaque"), removed=False)]
        return {"fdset-id": fdset_id, "fd": fd}

    def _remove_fd(self, arguments):
        fdset_id = arguments["fdset-id"]
        if fdset_id not in self.fdsets:
            raise qmp_error("File descriptor named 'fdset-id:%d' not found" % fdset_id)
        for entry in self.fdsets[fdset_id]:
            entry["removed"] = True
        self._clean_fdset(fdset_id)
        return {}

    def _clean_fdset(self, fdset_id):
        """QEMU closes removed descriptors only while the VM runs, and drops an fdset once nothing opened it."""
        fds = self.fdsets.get(fdset_id)
        if fds is None:
            return
        if self.status == "running":
            for entry in [entry for entry in fds if entry["removed"]]:
                os.close(entry["fd"])
                fds.remove(entry)
        if not fds and not any(node.fdset == fdset_id for node in self.nodes.values()):
            del self.fdsets[fdset_id]

    def _query_fdsets(self, _arguments):
        return [{"fdset-id": fdset_id, "fds": [dict({"fd": entry["fd"]}, **(
            {"opaque": entry["opaque"]} if entry["opaque"] is not None else {})) for entry in fds]}
            for fdset_id, fds in sorted(self.fdsets.items())]

    def _getfd(self, arguments):
        fd = self._take_fd()
        old = self.named_fds.pop(arguments["fdname"], None)
        if old is not None:
            os.close(old)  # QEMU replaces a descriptor of the same name
        self.named_fds[arguments["fdname"]] = fd
        return {}

    def _closefd(self, arguments):
        os.close(self._named_fd(arguments["fdname"], pop=True))
        return {}

    def _named_fd(self, fdname, pop=False):
        if fdname not in self.named_fds:
            raise qmp_error("File descriptor named '%s' not found" % fdname)
        return self.named_fds.pop(fdname) if pop else self.named_fds[fdname]

    # --- NBD ----------------------------------------------------------------------------------------------------

    def _nbd_server_start(self, arguments):
        if self.nbd_server is not None:
            raise qmp_error("NBD server already running")
        address = arguments["addr"]
        assert address["type"] == "fd", "the fake QEMU serves NBD only on a listener handed to it"
        creds = arguments.get("tls-creds")
        if creds and self.objects.get(creds, {}).get("endpoint") != "server":
            raise qmp_error("No TLS credentials with id '%s' for a server" % creds)
        listener = socket.socket(fileno=self._named_fd(address["data"]["str"]))
        if not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            listener.detach()
            raise qmp_error("Socket is not listening")
        del self.named_fds[address["data"]["str"]]  # the server owns it now
        self.nbd_server = {"listener": listener, "address": listener.getsockname(), "tls-creds": creds,
                           "tls-authz": arguments.get("tls-authz")}
        return {}

    def _nbd_server_stop(self, _arguments):
        if self.nbd_server is None:
            raise qmp_error("NBD server not running")
        for export_id in list(self.exports):
            self._delete_export(export_id)
        self.nbd_server.pop("listener").close()
        self.nbd_server = None
        return {}

    def _block_export_add(self, arguments):
        assert arguments["type"] == "nbd", "the fake QEMU models only NBD exports"
        if self.nbd_server is None:
            raise qmp_error("NBD server not running")
        if arguments["id"] in self.exports:
            raise qmp_error("Block export id '%s' is already in use" % arguments["id"])
        if any(e["name"] == arguments["name"] for e in self.exports.values()):
            raise qmp_error("NBD server already has export named '%s'" % arguments["name"])
        self._node(arguments["node-name"])
        bitmaps = [self._usable_bitmap(b["node"], b["name"]) for b in arguments.get("bitmaps", [])]
        for info in bitmaps:
            if info["recording"] and not arguments.get("writable"):
                raise qmp_error("Enabled bitmap '%s' incompatible with readonly export" % info["name"])
        for info in bitmaps:
            info["busy"] = True
        self.exports[arguments["id"]] = copy.deepcopy(arguments)
        return {}

    def _block_export_del(self, arguments):
        if arguments["id"] not in self.exports:
            raise qmp_error("Export '%s' is not found" % arguments["id"])
        self._delete_export(arguments["id"])
        return {}

    def _delete_export(self, export_id):
        for entry in self.exports.pop(export_id).get("bitmaps", []):
            self._bitmap(entry["node"], entry["name"])["busy"] = False
        self.events.append({"event": "BLOCK_EXPORT_DELETED", "data": {"id": export_id}})

    # --- dirty bitmaps ------------------------------------------------------------------------------------------

    def _bitmap(self, node, name):
        bitmaps = self._node(node).bitmaps
        if name not in bitmaps:
            raise qmp_error("Dirty bitmap '%s' not found" % name)
        return bitmaps[name]

    def _bitmap_add(self, arguments):
        node = self._node(arguments["node"])
        if arguments["name"] in node.bitmaps:
            raise qmp_error("Bitmap already exists: %s" % arguments["name"])
        if arguments.get("persistent") and node.driver != "qcow2":
            raise qmp_error("Cannot store dirty bitmaps in %s format" % node.driver)
        node.bitmaps[arguments["name"]] = bitmap(arguments["name"], granularity=arguments.get("granularity", 65536),
                                                 persistent=bool(arguments.get("persistent")),
                                                 recording=not arguments.get("disabled"))
        return {}

    def _bitmap_merge(self, arguments):
        target = self._usable_bitmap(arguments["node"], arguments["target"])
        for source in arguments["bitmaps"]:
            node, name = (arguments["node"], source) if isinstance(source, str) else (source["node"], source["name"])
            target["count"] = max(target["count"], self._bitmap(node, name)["count"])  # a union: close enough
        return {}

    def _bitmap_remove(self, arguments):
        self._usable_bitmap(arguments["node"], arguments["name"])
        del self._node(arguments["node"]).bitmaps[arguments["name"]]
        return {}

    def _usable_bitmap(self, node, name):
        info = self._bitmap(node, name)
        if info["busy"]:
            raise qmp_error("Bitmap '%s' is currently in use by another operation and cannot be used" % name)
        return info

    def _transaction(self, arguments):
        """All the actions, or none."""
        kept = {name: copy.deepcopy(node.bitmaps) for name, node in self.nodes.items()}
        try:
            for action in arguments["actions"]:
                assert action["type"].startswith("block-dirty-bitmap-"), "the fake models only bitmap transactions"
                self.handlers[action["type"]](action["data"])
        except QmpCommandError:
            for name, bitmaps in kept.items():
                self.nodes[name].bitmaps = bitmaps
            raise
        return {}

    # --- objects ------------------------------------------------------------------------------------------------

    def _object_add(self, arguments):
        if arguments["id"] in self.objects:
            raise qmp_error("attempt to add duplicate property '%s' to object (type 'container')" % arguments["id"])
        entry = copy.deepcopy(arguments)
        if arguments["qom-type"] == "tls-creds-x509":
            entry["loaded"] = self._load_credentials(arguments["dir"], arguments["endpoint"])
        self.objects[arguments["id"]] = entry
        return {}

    @staticmethod
    def _load_credentials(directory, endpoint):
        """What QEMU reads, once, when it makes x509 credentials: the CA's certificate and its own pair."""
        loaded = {}
        for name in ("ca-cert.pem", "%s-cert.pem" % endpoint, "%s-key.pem" % endpoint):
            path = os.path.join(directory, name)
            try:
                if not stat.S_ISREG(os.stat(path).st_mode):
                    raise OSError("not a file")
                with open(path, "rb") as stream:
                    loaded[name] = stream.read()
            except OSError as err:
                raise qmp_error("Unable to access credentials %s: %s" % (path, err)) from None
        return loaded

    def _object_del(self, arguments):
        if arguments["id"] not in self.objects:
            raise qmp_error("object '%s' not found" % arguments["id"])
        del self.objects[arguments["id"]]
        return {}

    def _qom_list(self, arguments):
        assert arguments["path"] == "/objects", "the fake QEMU models only /objects"
        return [{"name": name, "type": "child<%s>" % entry["qom-type"]} for name, entry in self.objects.items()]
