# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A domain's guest agent, through libvirt's virDomainFSFreeze and virDomainFSThaw: no monitor command, no taint."""

from __future__ import annotations

from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_agent import (
    GuestAgentError,
    GuestAgentUnreachable,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_freeze import FreezeUnavailable
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.calls import LibvirtFailure, call

AGENT_CHANNEL = "org.qemu.guest_agent.0"


class LibvirtGuestAgent:
    """A domain's guest agent.

    libvirt bounds the wait for the agent itself (virsh guest-agent-timeout).
    """

    def __init__(self, vm):
        self.vm = vm

    def record(self):
        return {}  # libvirt knows its domain's agent

    def check(self):
        """Whether the domain has an agent channel that its guest has opened, as the live XML says: no agent call."""
        vm = self.vm
        if not vm.active():
            raise FreezeUnavailable("%s is not running" % vm.description)
        live = vm.xml()
        states = [target.get("state") for target in live.findall("./devices/channel/target")
                  if target.get("name") == AGENT_CHANNEL]
        if not states:
            raise FreezeUnavailable("%s has no guest agent channel (a <channel type='unix'> whose target is virtio, "
                                    "named %s; libvirt: VIR_ERR_ARGUMENT_UNSUPPORTED)" % (vm.description, AGENT_CHANNEL))
        if "connected" not in states:
            raise FreezeUnavailable("the guest agent of %s is not connected: is qemu-guest-agent running in the guest? "
                                    "(libvirt: VIR_ERR_AGENT_UNRESPONSIVE)" % vm.description)

    def freeze(self):
        return self._agent_call("Freezing the guest's file systems", self.vm.domain.fsFreeze)

    def thaw(self):
        return self._agent_call("Thawing the guest's file systems", self.vm.domain.fsThaw)

    thaw_if_frozen = thaw  # thawing file systems that are not frozen does nothing

    def close(self):
        pass

    def _agent_call(self, what, function):
        try:
            return call("%s of %s" % (what, self.vm.description), function)
        except LibvirtFailure as failure:
            message = str(failure)
            if failure.code == "VIR_ERR_ARGUMENT_UNSUPPORTED" or not self.vm.domain.isActive():
                raise GuestAgentUnreachable(message) from None  # no channel, or no domain: nothing can be frozen
            if failure.code == "VIR_ERR_AGENT_UNRESPONSIVE":
                raise FreezeUnavailable(message) from None
            raise GuestAgentError(message) from None
