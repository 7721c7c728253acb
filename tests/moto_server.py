"""moto's server, as the tests run it, with one fix to its speed (not to what it answers).

To be able to roll a failed `TransactWriteItems` back, moto keeps a deep copy of the table,
made once per item of the transaction: every item and stream record of the table, up to a
hundred times a call. On a table of 10,000 items one copy takes most of a second, so a
transaction that DynamoDB answers in milliseconds takes seconds, more the more the table holds.

Here the copy to roll back to shares the items the transaction does not name (it cannot change
them) and deep-copies only those it names, once per table and call. moto's answers and its
rollbacks are unchanged. One fix to what it does: a rolled-back transaction keeps the table's
stream shard (cut back to before the transaction) instead of restoring a copy of it, which left
every shard iterator already handed out reading a shard no later write reached (the stream went
quiet for good after the first cancelled transaction, e.g. two processors racing on presence).

It also answers DynamoDB's requests one at a time (moto's server runs each request on a thread
of its own, and its tables are plain Python dicts: a write during another request's walk of the
same table fails that request with "dictionary changed size during iteration", a 500). Python
runs one thread at a time anyway, so little is lost.

Run as `.venv/bin/python tests/moto_server.py -H 127.0.0.1 -p PORT` (moto_server's arguments).
"""

import copy
import sys
import threading
from collections import defaultdict

import moto.dynamodb.models as dynamodb_models
from moto.dynamodb.models.dynamo_type import DynamoType
from moto.dynamodb.models.table import Table
from moto.dynamodb.responses import DynamoHandler
from moto.server import main

_local = threading.local()


def _named_keys(table, transact_items):
    """The (hash, range) keys the transaction names in `table`, as moto indexes its items."""
    keys = []
    for entry in transact_items:
        _, op = next(iter(entry.items()))
        if op.get("TableName") != table.name:
            continue
        attrs = op.get("Item") if "Item" in op else op.get("Key", {})
        if table.hash_key_attr not in attrs:
            continue
        hash_key = DynamoType(attrs[table.hash_key_attr])
        range_key = None
        if table.range_key_attr is not None:
            if table.range_key_attr not in attrs:
                continue
            range_key = DynamoType(attrs[table.range_key_attr])
        keys.append((hash_key, range_key))
    return keys


def _rollback_copy(table):
    """What moto's deep copy of `table` would restore, sharing the items no one changes."""
    snapshot = copy.copy(table)
    ranged = table.range_key_attr is not None
    if ranged:
        snapshot.items = defaultdict(dict, {h: dict(rs) for h, rs in table.items.items()})
    else:
        snapshot.items = defaultdict(dict, table.items)
    for hash_key, range_key in _named_keys(table, _local.transact_items):
        if ranged:
            item = table.items.get(hash_key, {}).get(range_key)
            if item is not None:
                snapshot.items[hash_key][range_key] = copy.deepcopy(item)
        else:
            item = table.items.get(hash_key)
            if item is not None:
                snapshot.items[hash_key] = copy.deepcopy(item)
    if table.stream_shard is not None:
        # The same shard object, cut back to its length now if the transaction is rolled back:
        # the shard iterators the Streams API handed out point at this object, and a copy (what
        # moto's deep copy restores) would leave every reader after a rollback on a shard no
        # write reaches again: the stream would look empty from then on.
        snapshot.stream_shard = table.stream_shard
        _local.shards.append((table.stream_shard, len(table.stream_shard.items), snapshot))
    return snapshot


class _CopyInTransactions:
    """`copy` as moto's DynamoDB module sees it: a table's copy inside a transaction is made
    once, by `_rollback_copy`; everything else is `copy` itself."""

    def __getattr__(self, name):
        return getattr(copy, name)

    @staticmethod
    def deepcopy(value, memo=None):
        copies = getattr(_local, "copies", None)
        if copies is None or memo is not None or not isinstance(value, Table):
            return copy.deepcopy(value, memo)
        key = id(value)
        if key not in copies:
            copies[key] = (value, _rollback_copy(value))
        return copies[key][1]


_transact = dynamodb_models.DynamoDBBackend.transact_write_items


def _transact_write_items(self, transact_items):
    _local.copies, _local.transact_items, _local.shards = {}, transact_items, []
    try:
        return _transact(self, transact_items)
    except Exception:
        for shard, length, snapshot in _local.shards:
            if self.tables.get(snapshot.name) is snapshot:
                # Rolled back: the records the cancelled writes left go, as in DynamoDB.
                del shard.items[length:]
                shard.table = snapshot
        raise
    finally:
        _local.copies, _local.transact_items, _local.shards = None, None, None


dynamodb_models.copy = _CopyInTransactions()
dynamodb_models.DynamoDBBackend.transact_write_items = _transact_write_items

_one_at_a_time = threading.Lock()
_call_action = DynamoHandler.call_action


def _call_action_alone(self):
    with _one_at_a_time:
        return _call_action(self)


DynamoHandler.call_action = _call_action_alone

if __name__ == "__main__":
    sys.exit(main())
