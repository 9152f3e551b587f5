# The KVM uAPI ioctl numbers and struct sizes hvkit uses, taken from <linux/kvm.h>
# at build time so Python never hard-codes them.

cdef extern from "linux/kvm.h":
    enum:
        KVM_GET_API_VERSION
        KVM_CREATE_VM
        KVM_CHECK_EXTENSION
        KVM_GET_VCPU_MMAP_SIZE
        KVM_GET_SUPPORTED_CPUID
        KVM_GET_MSR_INDEX_LIST
        KVM_GET_MSR_FEATURE_INDEX_LIST
        KVM_GET_EMULATED_CPUID
        KVM_SET_USER_MEMORY_REGION
        KVM_GET_DIRTY_LOG
        KVM_CLEAR_DIRTY_LOG
        KVM_SET_TSS_ADDR
        KVM_SET_IDENTITY_MAP_ADDR
        KVM_CREATE_IRQCHIP
        KVM_CREATE_PIT2
        KVM_IRQ_LINE
        KVM_IRQ_LINE_STATUS
        KVM_SIGNAL_MSI
        KVM_IOEVENTFD
        KVM_IRQFD
        KVM_SET_TSC_KHZ
        KVM_GET_TSC_KHZ
        KVM_ENABLE_CAP
        KVM_CREATE_VCPU
        KVM_SET_GSI_ROUTING
        KVM_GET_IRQCHIP
        KVM_SET_IRQCHIP
        KVM_GET_PIT2
        KVM_SET_PIT2
        KVM_GET_CLOCK
        KVM_SET_CLOCK
        KVM_X86_SET_MSR_FILTER
        KVM_GET_REGS
        KVM_SET_REGS
        KVM_GET_SREGS
        KVM_SET_SREGS
        KVM_GET_FPU
        KVM_SET_FPU
        KVM_GET_XSAVE
        KVM_SET_XSAVE
        KVM_GET_XCRS
        KVM_SET_XCRS
        KVM_GET_MSRS
        KVM_SET_MSRS
        KVM_SET_CPUID2
        KVM_GET_CPUID2
        KVM_GET_LAPIC
        KVM_SET_LAPIC
        KVM_GET_VCPU_EVENTS
        KVM_SET_VCPU_EVENTS
        KVM_GET_MP_STATE
        KVM_SET_MP_STATE
        KVM_RUN
        KVM_SET_GUEST_DEBUG
        KVM_TRANSLATE
        KVM_NMI
        KVM_INTERRUPT
        KVM_GET_DEBUGREGS
        KVM_SET_DEBUGREGS
        KVM_GET_STATS_FD
    struct kvm_run:
        pass
    struct kvm_regs:
        pass
    struct kvm_sregs:
        pass
    struct kvm_fpu:
        pass
    struct kvm_xsave:
        pass
    struct kvm_xcrs:
        pass
    struct kvm_msrs:
        pass
    struct kvm_msr_entry:
        pass
    struct kvm_msr_list:
        pass
    struct kvm_cpuid2:
        pass
    struct kvm_cpuid_entry2:
        pass
    struct kvm_lapic_state:
        pass
    struct kvm_vcpu_events:
        pass
    struct kvm_mp_state:
        pass
    struct kvm_userspace_memory_region:
        pass
    struct kvm_dirty_log:
        pass
    struct kvm_clear_dirty_log:
        pass
    struct kvm_irq_level:
        pass
    struct kvm_msi:
        pass
    struct kvm_ioeventfd:
        pass
    struct kvm_irqfd:
        pass
    struct kvm_enable_cap:
        pass
    struct kvm_pit_config:
        pass
    struct kvm_irq_routing:
        pass
    struct kvm_irq_routing_entry:
        pass
    struct kvm_irqchip:
        pass
    struct kvm_pit_state2:
        pass
    struct kvm_clock_data:
        pass
    struct kvm_msr_filter:
        pass
    struct kvm_msr_filter_range:
        pass
    struct kvm_guest_debug:
        pass
    struct kvm_translation:
        pass
    struct kvm_debugregs:
        pass
    struct kvm_interrupt:
        pass
    struct kvm_segment:
        pass
    struct kvm_dtable:
        pass

IOCTLS = {
    'GET_API_VERSION': <unsigned long>KVM_GET_API_VERSION,
    'CREATE_VM': <unsigned long>KVM_CREATE_VM,
    'CHECK_EXTENSION': <unsigned long>KVM_CHECK_EXTENSION,
    'GET_VCPU_MMAP_SIZE': <unsigned long>KVM_GET_VCPU_MMAP_SIZE,
    'GET_SUPPORTED_CPUID': <unsigned long>KVM_GET_SUPPORTED_CPUID,
    'GET_MSR_INDEX_LIST': <unsigned long>KVM_GET_MSR_INDEX_LIST,
    'GET_MSR_FEATURE_INDEX_LIST': <unsigned long>KVM_GET_MSR_FEATURE_INDEX_LIST,
    'GET_EMULATED_CPUID': <unsigned long>KVM_GET_EMULATED_CPUID,
    'SET_USER_MEMORY_REGION': <unsigned long>KVM_SET_USER_MEMORY_REGION,
    'GET_DIRTY_LOG': <unsigned long>KVM_GET_DIRTY_LOG,
    'CLEAR_DIRTY_LOG': <unsigned long>KVM_CLEAR_DIRTY_LOG,
    'SET_TSS_ADDR': <unsigned long>KVM_SET_TSS_ADDR,
    'SET_IDENTITY_MAP_ADDR': <unsigned long>KVM_SET_IDENTITY_MAP_ADDR,
    'CREATE_IRQCHIP': <unsigned long>KVM_CREATE_IRQCHIP,
    'CREATE_PIT2': <unsigned long>KVM_CREATE_PIT2,
    'IRQ_LINE': <unsigned long>KVM_IRQ_LINE,
    'IRQ_LINE_STATUS': <unsigned long>KVM_IRQ_LINE_STATUS,
    'SIGNAL_MSI': <unsigned long>KVM_SIGNAL_MSI,
    'IOEVENTFD': <unsigned long>KVM_IOEVENTFD,
    'IRQFD': <unsigned long>KVM_IRQFD,
    'SET_TSC_KHZ': <unsigned long>KVM_SET_TSC_KHZ,
    'GET_TSC_KHZ': <unsigned long>KVM_GET_TSC_KHZ,
    'ENABLE_CAP': <unsigned long>KVM_ENABLE_CAP,
    'CREATE_VCPU': <unsigned long>KVM_CREATE_VCPU,
    'SET_GSI_ROUTING': <unsigned long>KVM_SET_GSI_ROUTING,
    'GET_IRQCHIP': <unsigned long>KVM_GET_IRQCHIP,
    'SET_IRQCHIP': <unsigned long>KVM_SET_IRQCHIP,
    'GET_PIT2': <unsigned long>KVM_GET_PIT2,
    'SET_PIT2': <unsigned long>KVM_SET_PIT2,
    'GET_CLOCK': <unsigned long>KVM_GET_CLOCK,
    'SET_CLOCK': <unsigned long>KVM_SET_CLOCK,
    'X86_SET_MSR_FILTER': <unsigned long>KVM_X86_SET_MSR_FILTER,
    'GET_REGS': <unsigned long>KVM_GET_REGS,
    'SET_REGS': <unsigned long>KVM_SET_REGS,
    'GET_SREGS': <unsigned long>KVM_GET_SREGS,
    'SET_SREGS': <unsigned long>KVM_SET_SREGS,
    'GET_FPU': <unsigned long>KVM_GET_FPU,
    'SET_FPU': <unsigned long>KVM_SET_FPU,
    'GET_XSAVE': <unsigned long>KVM_GET_XSAVE,
    'SET_XSAVE': <unsigned long>KVM_SET_XSAVE,
    'GET_XCRS': <unsigned long>KVM_GET_XCRS,
    'SET_XCRS': <unsigned long>KVM_SET_XCRS,
    'GET_MSRS': <unsigned long>KVM_GET_MSRS,
    'SET_MSRS': <unsigned long>KVM_SET_MSRS,
    'SET_CPUID2': <unsigned long>KVM_SET_CPUID2,
    'GET_CPUID2': <unsigned long>KVM_GET_CPUID2,
    'GET_LAPIC': <unsigned long>KVM_GET_LAPIC,
    'SET_LAPIC': <unsigned long>KVM_SET_LAPIC,
    'GET_VCPU_EVENTS': <unsigned long>KVM_GET_VCPU_EVENTS,
    'SET_VCPU_EVENTS': <unsigned long>KVM_SET_VCPU_EVENTS,
    'GET_MP_STATE': <unsigned long>KVM_GET_MP_STATE,
    'SET_MP_STATE': <unsigned long>KVM_SET_MP_STATE,
    'RUN': <unsigned long>KVM_RUN,
    'SET_GUEST_DEBUG': <unsigned long>KVM_SET_GUEST_DEBUG,
    'TRANSLATE': <unsigned long>KVM_TRANSLATE,
    'NMI': <unsigned long>KVM_NMI,
    'INTERRUPT': <unsigned long>KVM_INTERRUPT,
    'GET_DEBUGREGS': <unsigned long>KVM_GET_DEBUGREGS,
    'SET_DEBUGREGS': <unsigned long>KVM_SET_DEBUGREGS,
    'GET_STATS_FD': <unsigned long>KVM_GET_STATS_FD,
}
SIZES = {
    'run': sizeof(kvm_run),
    'regs': sizeof(kvm_regs),
    'sregs': sizeof(kvm_sregs),
    'fpu': sizeof(kvm_fpu),
    'xsave': sizeof(kvm_xsave),
    'xcrs': sizeof(kvm_xcrs),
    'msrs': sizeof(kvm_msrs),
    'msr_entry': sizeof(kvm_msr_entry),
    'msr_list': sizeof(kvm_msr_list),
    'cpuid2': sizeof(kvm_cpuid2),
    'cpuid_entry2': sizeof(kvm_cpuid_entry2),
    'lapic_state': sizeof(kvm_lapic_state),
    'vcpu_events': sizeof(kvm_vcpu_events),
    'mp_state': sizeof(kvm_mp_state),
    'userspace_memory_region': sizeof(kvm_userspace_memory_region),
    'dirty_log': sizeof(kvm_dirty_log),
    'clear_dirty_log': sizeof(kvm_clear_dirty_log),
    'irq_level': sizeof(kvm_irq_level),
    'msi': sizeof(kvm_msi),
    'ioeventfd': sizeof(kvm_ioeventfd),
    'irqfd': sizeof(kvm_irqfd),
    'enable_cap': sizeof(kvm_enable_cap),
    'pit_config': sizeof(kvm_pit_config),
    'irq_routing': sizeof(kvm_irq_routing),
    'irq_routing_entry': sizeof(kvm_irq_routing_entry),
    'irqchip': sizeof(kvm_irqchip),
    'pit_state2': sizeof(kvm_pit_state2),
    'clock_data': sizeof(kvm_clock_data),
    'msr_filter': sizeof(kvm_msr_filter),
    'msr_filter_range': sizeof(kvm_msr_filter_range),
    'guest_debug': sizeof(kvm_guest_debug),
    'translation': sizeof(kvm_translation),
    'debugregs': sizeof(kvm_debugregs),
    'interrupt': sizeof(kvm_interrupt),
    'segment': sizeof(kvm_segment),
    'dtable': sizeof(kvm_dtable),
}

# Offset and size of every struct member whose layout Python packs by hand
# (hvkit.kvm.structs checks its format strings against these at import).
cdef extern from *:
    """
    #include <stddef.h>
    #include <linux/kvm.h>
    typedef struct { const char *st; const char *field; size_t off, size; } hv_field;
    #define HV_F(s, f) { #s, #f, offsetof(struct kvm_##s, f), \\
                         sizeof(((struct kvm_##s *)0)->f) }
    /* A flexible array member: its offset only (size 0). */
    #define HV_FA(s, f) { #s, #f, offsetof(struct kvm_##s, f), 0 }
    static const hv_field hv_fields[] = {
        HV_F(regs, rax), HV_F(regs, rbx), HV_F(regs, rcx), HV_F(regs, rdx),
        HV_F(regs, rsi), HV_F(regs, rdi), HV_F(regs, rsp), HV_F(regs, rbp),
        HV_F(regs, r8), HV_F(regs, r9), HV_F(regs, r10), HV_F(regs, r11),
        HV_F(regs, r12), HV_F(regs, r13), HV_F(regs, r14), HV_F(regs, r15),
        HV_F(regs, rip), HV_F(regs, rflags),
        HV_F(segment, base), HV_F(segment, limit), HV_F(segment, selector),
        HV_F(segment, type), HV_F(segment, present), HV_F(segment, dpl),
        HV_F(segment, db), HV_F(segment, s), HV_F(segment, l), HV_F(segment, g),
        HV_F(segment, avl), HV_F(segment, unusable),
        HV_F(dtable, base), HV_F(dtable, limit),
        HV_F(sregs, cs), HV_F(sregs, ds), HV_F(sregs, es), HV_F(sregs, fs),
        HV_F(sregs, gs), HV_F(sregs, ss), HV_F(sregs, tr), HV_F(sregs, ldt),
        HV_F(sregs, gdt), HV_F(sregs, idt), HV_F(sregs, cr0), HV_F(sregs, cr2),
        HV_F(sregs, cr3), HV_F(sregs, cr4), HV_F(sregs, cr8), HV_F(sregs, efer),
        HV_F(sregs, apic_base), HV_F(sregs, interrupt_bitmap),
        HV_F(fpu, fpr), HV_F(fpu, fcw), HV_F(fpu, fsw), HV_F(fpu, ftwx),
        HV_F(fpu, last_opcode), HV_F(fpu, last_ip), HV_F(fpu, last_dp),
        HV_F(fpu, xmm), HV_F(fpu, mxcsr),
        HV_F(vcpu_events, exception.injected), HV_F(vcpu_events, exception.nr),
        HV_F(vcpu_events, exception.has_error_code), HV_F(vcpu_events, exception.pending),
        HV_F(vcpu_events, exception.error_code), HV_F(vcpu_events, interrupt.injected),
        HV_F(vcpu_events, interrupt.nr), HV_F(vcpu_events, interrupt.soft),
        HV_F(vcpu_events, interrupt.shadow), HV_F(vcpu_events, nmi.injected),
        HV_F(vcpu_events, nmi.pending), HV_F(vcpu_events, nmi.masked),
        HV_F(vcpu_events, sipi_vector), HV_F(vcpu_events, flags),
        HV_F(vcpu_events, smi.smm), HV_F(vcpu_events, smi.pending),
        HV_F(vcpu_events, smi.smm_inside_nmi), HV_F(vcpu_events, smi.latched_init),
        HV_F(vcpu_events, triple_fault.pending), HV_F(vcpu_events, exception_has_payload),
        HV_F(vcpu_events, exception_payload),
        HV_F(cpuid2, nent), HV_FA(cpuid2, entries),
        HV_F(cpuid_entry2, function), HV_F(cpuid_entry2, index), HV_F(cpuid_entry2, flags),
        HV_F(cpuid_entry2, eax), HV_F(cpuid_entry2, ebx), HV_F(cpuid_entry2, ecx),
        HV_F(cpuid_entry2, edx),
        HV_F(msrs, nmsrs), HV_FA(msrs, entries),
        HV_F(msr_entry, index), HV_F(msr_entry, reserved), HV_F(msr_entry, data),
        HV_F(xcrs, nr_xcrs), HV_F(xcrs, flags), HV_F(xcrs, xcrs),
        HV_F(xcr, xcr), HV_F(xcr, reserved), HV_F(xcr, value),
        HV_F(lapic_state, regs),
        HV_F(userspace_memory_region, slot), HV_F(userspace_memory_region, flags),
        HV_F(userspace_memory_region, guest_phys_addr),
        HV_F(userspace_memory_region, memory_size),
        HV_F(userspace_memory_region, userspace_addr),
        HV_F(dirty_log, slot), HV_F(dirty_log, dirty_bitmap),
        HV_F(clear_dirty_log, slot), HV_F(clear_dirty_log, num_pages),
        HV_F(clear_dirty_log, first_page), HV_F(clear_dirty_log, dirty_bitmap),
        HV_F(irq_level, irq), HV_F(irq_level, level),
        HV_F(msi, address_lo), HV_F(msi, address_hi), HV_F(msi, data), HV_F(msi, flags),
        HV_F(msi, devid),
        HV_F(ioeventfd, datamatch), HV_F(ioeventfd, addr), HV_F(ioeventfd, len),
        HV_F(ioeventfd, fd), HV_F(ioeventfd, flags),
        HV_F(irqfd, fd), HV_F(irqfd, gsi), HV_F(irqfd, flags), HV_F(irqfd, resamplefd),
        HV_F(enable_cap, cap), HV_F(enable_cap, flags), HV_F(enable_cap, args),
        HV_F(pit_config, flags),
        HV_F(irq_routing, nr), HV_FA(irq_routing, entries),
        HV_F(irq_routing_entry, gsi), HV_F(irq_routing_entry, type),
        HV_F(irq_routing_entry, flags), HV_F(irq_routing_entry, u),
        HV_F(clock_data, clock), HV_F(clock_data, flags), HV_F(clock_data, realtime),
        HV_F(clock_data, host_tsc),
        HV_F(msr_filter, flags), HV_F(msr_filter, ranges),
        HV_F(msr_filter_range, flags), HV_F(msr_filter_range, nmsrs),
        HV_F(msr_filter_range, base), HV_F(msr_filter_range, bitmap),
        HV_F(guest_debug, control), HV_F(guest_debug, arch),
        HV_F(translation, linear_address), HV_F(translation, physical_address),
        HV_F(translation, valid), HV_F(translation, writeable), HV_F(translation, usermode),
        HV_F(mp_state, mp_state),
        { 0, 0, 0, 0 }
    };
    static const hv_field *hv_field_table(void) { return hv_fields; }
    """
    ctypedef struct hv_field:
        const char *st
        const char *field
        size_t off
        size_t size
    const hv_field *hv_field_table()


cdef dict _field_offsets():
    cdef const hv_field *f = hv_field_table()
    out = {}
    while f.st != NULL:
        out[(f.st.decode(), f.field.decode())] = (f.off, f.size)
        f += 1
    return out


# (struct, member) -> (offset, size), e.g. ("vcpu_events", "exception.nr") -> (1, 1)
FIELD_OFFSETS = _field_offsets()
