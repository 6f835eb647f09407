"""CRM plugin: unified customers across channels, orders, tags, RFM segments,
membership and targeted broadcasts. Storage is ``repository.CrmRepository`` (SQLite)
behind the ``repository.CrmStore`` protocol; the logic modules are pure given the
store contents and an explicit ``now``."""

from workers.crm.broadcast import BroadcastPlan, BroadcastPlanner, PlannedSend
from workers.crm.importer import ImportReport, RowError, import_customers, import_orders
from workers.crm.loyalty import LoyaltyEngine, is_vip, level_for, points_for
from workers.crm.models import (
    Customer,
    CustomerProfile,
    Identity,
    Order,
    OrderInfo,
    OrderItem,
    RfmScore,
    Segment,
    Tag,
)
from workers.crm.repository import CrmRepository, CrmStore, OrderLookup
from workers.crm.rfm import RfmPolicy, RfmScorer, compute_rfm, segment_for
from workers.crm.tagging import DEFAULT_RULES, Condition, TagEngine, TagRule, load_rules

__all__ = [
    "DEFAULT_RULES",
    "BroadcastPlan",
    "BroadcastPlanner",
    "Condition",
    "CrmRepository",
    "CrmStore",
    "Customer",
    "CustomerProfile",
    "Identity",
    "ImportReport",
    "LoyaltyEngine",
    "Order",
    "OrderInfo",
    "OrderItem",
    "OrderLookup",
    "PlannedSend",
    "RfmPolicy",
    "RfmScore",
    "RfmScorer",
    "RowError",
    "Segment",
    "Tag",
    "TagEngine",
    "TagRule",
    "compute_rfm",
    "import_customers",
    "import_orders",
    "is_vip",
    "level_for",
    "load_rules",
    "points_for",
    "segment_for",
]
