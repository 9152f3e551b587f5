"""NVMe base specification constants (revision 1.4 numbering)."""
from __future__ import annotations

# -- controller registers (BAR0) --------------------------------------------
REG_CAP = 0x00
REG_VS = 0x08
REG_INTMS = 0x0C
REG_INTMC = 0x10
REG_CC = 0x14
REG_CSTS = 0x1C
REG_NSSR = 0x20
REG_AQA = 0x24
REG_ASQ = 0x28
REG_ACQ = 0x30
REG_CMBLOC = 0x38
REG_CMBSZ = 0x3C
DOORBELL_BASE = 0x1000

VERSION_1_4 = 0x00010400

CC_EN = 1 << 0
CC_CSS_SHIFT, CC_CSS_MASK = 4, 0x7
CC_MPS_SHIFT, CC_MPS_MASK = 7, 0xF
CC_AMS_SHIFT, CC_AMS_MASK = 11, 0x7
CC_SHN_SHIFT, CC_SHN_MASK = 14, 0x3
CC_IOSQES_SHIFT, CC_IOSQES_MASK = 16, 0xF
CC_IOCQES_SHIFT, CC_IOCQES_MASK = 20, 0xF
CC_WRITABLE = 0x00FF_FFF1

CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_SHIFT = 2
SHST_NORMAL, SHST_OCCURRING, SHST_COMPLETE = 0, 1, 2

SQE_SIZE = 64
CQE_SIZE = 16
SQES_LOG2 = 6
CQES_LOG2 = 4

# -- opcodes ------------------------------------------------------------------
ADM_DELETE_SQ = 0x00
ADM_CREATE_SQ = 0x01
ADM_GET_LOG_PAGE = 0x02
ADM_DELETE_CQ = 0x04
ADM_CREATE_CQ = 0x05
ADM_IDENTIFY = 0x06
ADM_ABORT = 0x08
ADM_SET_FEATURES = 0x09
ADM_GET_FEATURES = 0x0A
ADM_ASYNC_EVENT = 0x0C
ADM_DBBUF_CONFIG = 0x7C

IO_FLUSH = 0x00
IO_WRITE = 0x01
IO_READ = 0x02
IO_WRITE_ZEROES = 0x08
IO_DSM = 0x09

# -- status: (SCT << 8) | SC; DNR is added by the completion writer ----------
SCT_GENERIC = 0
SCT_COMMAND = 1
SCT_MEDIA = 2

SUCCESS = 0x0000
INVALID_OPCODE = 0x0001
INVALID_FIELD = 0x0002
CID_CONFLICT = 0x0003
DATA_TRANSFER_ERROR = 0x0004
INTERNAL_ERROR = 0x0006
ABORT_REQUESTED = 0x0007
ABORTED_SQ_DELETED = 0x0008
INVALID_NAMESPACE = 0x000B
COMMAND_SEQUENCE_ERROR = 0x000C
PRP_OFFSET_INVALID = 0x0013
NAMESPACE_WRITE_PROTECTED = 0x0020
LBA_OUT_OF_RANGE = 0x0080
CAPACITY_EXCEEDED = 0x0081
NAMESPACE_NOT_READY = 0x0082

CQ_INVALID = 0x0100
INVALID_QUEUE_ID = 0x0101
INVALID_QUEUE_SIZE = 0x0102
ABORT_LIMIT_EXCEEDED = 0x0103
AER_LIMIT_EXCEEDED = 0x0105
INVALID_INTERRUPT_VECTOR = 0x0108
INVALID_LOG_PAGE = 0x0109
INVALID_QUEUE_DELETION = 0x010C
FEATURE_NOT_SAVEABLE = 0x010D
FEATURE_NOT_CHANGEABLE = 0x010E

WRITE_FAULT = 0x0280
UNRECOVERED_READ_ERROR = 0x0281

STATUS_DNR = 1 << 14

# -- identify -------------------------------------------------------------------
CNS_NAMESPACE = 0x00
CNS_CONTROLLER = 0x01
CNS_ACTIVE_NS_LIST = 0x02
CNS_NS_DESCRIPTORS = 0x03

OACS_DBBUF = 1 << 8
ONCS_DSM = 1 << 2
ONCS_WRITE_ZEROES = 1 << 3
ONCS_SET_FEATURES_SAVE = 1 << 4

# -- features ---------------------------------------------------------------------
FEAT_ARBITRATION = 0x01
FEAT_POWER_MGMT = 0x02
FEAT_TEMP_THRESHOLD = 0x04
FEAT_ERROR_RECOVERY = 0x05
FEAT_VOLATILE_WC = 0x06
FEAT_NUM_QUEUES = 0x07
FEAT_IRQ_COALESCING = 0x08
FEAT_IRQ_CONFIG = 0x09
FEAT_WRITE_ATOMICITY = 0x0A
FEAT_ASYNC_EVENT_CONFIG = 0x0B

# -- log pages ------------------------------------------------------------------------
LOG_ERROR = 0x01
LOG_SMART = 0x02
LOG_FW_SLOT = 0x03
ERROR_LOG_ENTRY_SIZE = 64
SMART_LOG_SIZE = 512
FW_SLOT_LOG_SIZE = 512

# -- asynchronous events ------------------------------------------------------------------
AER_TYPE_ERROR = 0
AER_TYPE_SMART = 1
AER_TYPE_NOTICE = 2
AER_INFO_INVALID_DB_REGISTER = 0x00
AER_INFO_INVALID_DB_VALUE = 0x01

# -- dataset management ----------------------------------------------------------------------
DSM_ATTR_DEALLOCATE = 1 << 2
DSM_RANGE_SIZE = 16
DSM_MAX_RANGES = 256

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The EventIdx rule for shadow doorbells (the driver's side): after
    moving a shadow doorbell from ``old_idx`` to ``new_idx``, the driver
    must also write the MMIO doorbell iff the controller's EventIdx lies in
    [old_idx, new_idx) modulo 2^16 (Linux ``nvme_dbbuf_need_event``)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)
