"""moto's server, as the tests run it, with one fix to its speed (not to what it answers).

moto's `TransactWriteItems` keeps a copy of the table to roll back to, and makes it once per
item of the transaction: `copy.deepcopy` of every item and stream record of the table, up to a
hundred times a call. A transaction of 100 items on a table of a few thousand items then takes
seconds, where DynamoDB takes milliseconds, and the time grows with everything the table holds.
Here the copy is made once per table and call; moto's answers, rollbacks included, are unchanged.

Run as `.venv/bin/python tests/moto_server.py -H 127.0.0.1 -p PORT` (moto_server's arguments).
"""

import copy
import sys
import threading

import moto.dynamodb.models as dynamodb_models
from moto.server import main

_local = threading.local()


class _OncePerTransaction:
    """`copy` as moto's DynamoDB module sees it: inside a transaction, one deep copy per object."""

    def __getattr__(self, name):
        return getattr(copy, name)

    @staticmethod
    def deepcopy(value, memo=None):
        copies = getattr(_local, "copies", None)
        if copies is None or memo is not None:
            return copy.deepcopy(value, memo)
        key = id(value)
        if key not in copies:
            copies[key] = (value, copy.deepcopy(value))
        return copies[key][1]


_transact = dynamodb_models.DynamoDBBackend.transact_write_items


def _transact_write_items(self, transact_items):
    _local.copies = {}
    try:
        return _transact(self, transact_items)
    finally:
        _local.copies = None


dynamodb_models.copy = _OncePerTransaction()
dynamodb_models.DynamoDBBackend.transact_write_items = _transact_write_items

if __name__ == "__main__":
    sys.exit(main())
