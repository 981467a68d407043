# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The schema of a repository's manifest, which every reader checks before it uses one, and every writer before it
saves one: each field, what its value must be, and whether it must be there."""

from __future__ import annotations

import json

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import is_plain_name

MANIFEST_FORMAT = 1


class Value:
    """A field of the manifest: what a value must be, and whether the field must be there (null: may be null)."""

    def __init__(self, check, expected, required=False, null=False):
        self.check, self.expected, self.required, self.null = check, expected, required, null

    def problem(self, value, at):
        """(where, what is wrong there) when value does not fit, else None."""
        if (value is None and self.null) or self.check(value):
            return None
        return at, "is %s, expected %s%s" % (json.dumps(value)[:80], self.expected, " or null" if self.null else "")


class Record(Value):
    """An object whose fields each have their Value."""

    def __init__(self, fields, required=False, null=False):
        super().__init__(lambda value: isinstance(value, dict), "an object", required, null)
        self.fields = fields

    def problem(self, value, at):
        problem = super().problem(value, at)
        if problem or value is None:
            return problem
        for name, field in self.fields.items():
            where = "%s.%s" % (at, name) if at else name
            if name not in value:
                if field.required:
                    return where, "is missing"
                continue
            problem = field.problem(value[name], where)
            if problem:
                return problem
        return None


class ListOf(Value):
    """A list whose items are each an element."""

    def __init__(self, element, items, required=False, at_least=0):
        super().__init__(lambda value: isinstance(value, list) and len(value) >= at_least,
                         "a list of %s%s" % ("at least %d " % at_least if at_least else "", items), required)
        self.element = element

    def problem(self, value, at):
        return super().problem(value, at) or next(
            (p for index, item in enumerate(value) for p in [self.element.problem(item, "%s[%d]" % (at, index))] if p),
            None)


def _one_of(*values, **kwargs):
    return Value(lambda value: value in values, "one of %s" % ", ".join(values), **kwargs)


def _text(**kwargs):
    return Value(lambda value: isinstance(value, str), "a string", **kwargs)


def _name(**kwargs):
    return Value(is_plain_name, "a plain file name (letters, digits and _.:@+- only, not starting with a dot)",
                 **kwargs)


def _whole(**kwargs):
    return Value(lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                 "a whole number of 0 or more", **kwargs)


def _seconds(**kwargs):
    return Value(lambda value: isinstance(value, (int, float)) and not isinstance(value, bool), "a time in seconds",
                 **kwargs)


# The manifest's schema, which every reader checks before it uses a manifest (check_manifest).
DISK_SCHEMA = Record(dict(
    disk=_name(required=True), file=_name(required=True), size=_whole(required=True), format=_one_of("qcow2", "raw"),
    bytes_read=_whole(), checksum=_text(null=True), mode=_one_of("full", "incremental"), backing=_name(null=True),
    encryption=_one_of("luks")))
DEFINITION_SCHEMA = Record(dict(
    domain_xml=_name(required=True), checkpoint_xml=_text(null=True), not_backed_up=ListOf(_text(), "strings"),
    nvram=Record(dict(file=_name(required=True), path=_text(required=True), sha256=_text(required=True)), null=True)),
    null=True)
BACKUP_SCHEMA = Record(dict(
    name=_name(required=True), level=_one_of("full", "incremental", required=True), parent=_name(null=True),
    chain=_name(required=True), checkpoint=_text(null=True), incremental=_text(null=True), started=_seconds(),
    finished=_seconds(required=True), disks=ListOf(DISK_SCHEMA, "disks", required=True, at_least=1),
    consistency=_text(null=True), freeze=Record({}, null=True), definition=DEFINITION_SCHEMA,
    dirty_bytes=_whole(), disk_bytes=_whole()))
# A merge in progress (consolidation.py): its step, and the files it writes and removes.
MERGE_SCHEMA = Record(dict(
    phase=_one_of("writing", "replacing", "removing", required=True), target=_name(null=True), onto=_name(null=True),
    drop=ListOf(_name(), "backup names", required=True), remove=ListOf(_name(), "file names", required=True),
    disks=ListOf(Record(dict(
        disk=_name(required=True), file=_name(required=True), temp=_name(required=True), backing=_name(null=True),
        checksum=_text(null=True), identity=Value(lambda value: isinstance(value, list) and len(value) == 2 and all(
            isinstance(number, int) for number in value), "[device, inode]", null=True))), "disks", required=True)),
    null=True)
MANIFEST_SCHEMA = Record(dict(format=_whole(required=True), vm=_text(),
                              backups=ListOf(BACKUP_SCHEMA, "backups", required=True), consolidation=MERGE_SCHEMA))


def check_manifest(data, path):
    """data, a manifest read from path, if it matches the schema; UserError naming the field otherwise."""
    problem = MANIFEST_SCHEMA.problem(data, "")
    if problem:
        raise UserError("The manifest %s does not match its schema: %s %s. Nothing was changed; restore the manifest "
                        "from a copy (its images are untouched)." % (path, problem[0] or "the manifest", problem[1]))
    if data["format"] != MANIFEST_FORMAT:
        raise UserError("The manifest %s has format %s; this collection reads format %d."
                        % (path, data["format"], MANIFEST_FORMAT))
    return data
