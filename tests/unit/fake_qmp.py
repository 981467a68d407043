"""A fake QMP monitor for unit tests of pure logic: canned answers, recorded commands."""


class FakeQmp:
    def __init__(self, answers):
        self.answers = answers
        self.commands = []

    def execute(self, command, arguments=None):
        self.commands.append((command, arguments))
        answer = self.answers[command]
        return answer(arguments) if callable(answer) else answer

    def transaction(self, actions):
        return self.execute("transaction", {"actions": [{"type": kind, "data": data} for kind, data in actions]})


def block_device(qdev, node, drv="qcow2", size=1 << 30, ro=False, device="", filename=None):
    return {"device": device, "qdev": qdev, "inserted": {
        "node-name": node, "drv": drv, "ro": ro, "file": filename or "/img/%s" % node,
        "image": {"virtual-size": size, "filename": filename or "/img/%s" % node, "format": drv}}}


def named_node(node, drv="qcow2", bitmaps=()):
    return {"node-name": node, "drv": drv, "file": "/img/%s" % node, "image": {"virtual-size": 1 << 30},
            "dirty-bitmaps": list(bitmaps)}


def bitmap(name, count=0, granularity=65536, inconsistent=False):
    info = {"name": name, "count": count, "granularity": granularity, "recording": True, "persistent": True,
            "busy": False}
    if inconsistent:
        info["inconsistent"] = True
    return info
