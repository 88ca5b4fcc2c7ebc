/*
 * pagemesh's built-in test guest: one workload loop over guest RAM, run at CPL3.
 *
 * Why CPL3: on hosts without VMX/SVM the kvm_pvm module runs guest user code natively but
 * emulates guest kernel code (about 1 us per instruction). The VMM therefore starts the vCPU
 * in 64-bit mode at CPL0, and a 7-instruction stub (`_entry0`) drops to user mode (CS=0x1b,
 * SS=0x23; ports allowed by the TSS I/O bitmap) with identity page tables whose entries all carry the U bit; the workload
 * itself never runs at CPL0.
 *
 * Entry: rdi = address of the parameter block (vm/guest.rs `Params`, identity mapped):
 *   +0 base   +8 pages   +16 order (0 seq, 1 random, 2 stride, 3 trace)   +24 op (0 read, 1 write,
 *   2 rmw, 3 verify)   +32 arg (stride: K pages; random: mask 2^k-1)   +40 seed
 *   +48 progress mask   +56 random shift   +104 pattern index of the first page
 *   +112 trace address (order 3: arg u32 page indices, one per access)
 * Results written back: +64 pages done  +72 checksum  +80 first bad page (-1: none)
 *   +88 bad pages  +96 0x600D when finished.
 * Port 0xF0 <- pages done, every (mask + 1) pages; port 0xF1 <- pages done, at the end.
 *
 * The pattern word j of page p is ((p * 512 + j + 1) * K) ^ seed, K = 0x9E3779B97F4A7C15
 * (node/src/pattern.rs).
 */
    .intel_syntax noprefix
    .code64
    .text
    /* The only CPL0 code: the VMM starts the vCPU here in 64-bit kernel mode and iretq
     * enters user mode. kvm_pvm keeps user-mode IOPL at 0 whatever RFLAGS says (measured),
     * so `out` at CPL3 works through the TSS I/O bitmap, which the VMM sets to allow all. */
    .globl _entry0
_entry0:
    mov     rax, rsp
    push    0x23                    /* SS: user data, RPL 3 */
    push    rax                     /* RSP */
    push    0x3002                  /* RFLAGS: IOPL=3, interrupts off */
    push    0x1b                    /* CS: user code, RPL 3 */
    lea     rax, [rip + _start]
    push    rax                     /* RIP */
    iretq


_start:
    mov     r8, [rdi + 0]           /* base */
    mov     r9, [rdi + 8]           /* pages */
    mov     r10, [rdi + 32]         /* arg */
    mov     r11, [rdi + 40]         /* seed */
    xor     r14d, r14d              /* pages done */
    xor     r15d, r15d              /* checksum */
    mov     rbx, -1                 /* first bad page */
    xor     ebp, ebp                /* bad pages */
    xor     r13d, r13d              /* order state */
    xor     r12d, r12d              /* stride start */
    mov     rax, [rdi + 16]
    cmp     rax, 1
    je      random_loop
    cmp     rax, 2
    je      stride_loop
    cmp     rax, 3
    je      trace_loop

seq_loop:
    cmp     r13, r9
    jae     finish
    mov     rax, r13
    inc     r13
    call    visit
    jmp     seq_loop

    /* A permutation of 0..2^k by a bijective hash on k bits; values >= pages are skipped
     * (cycle walking), so every page is visited exactly once in a scattered order. */
random_loop:
    cmp     r13, r10
    ja      finish
    mov     rax, r13
    inc     r13
    mov     rcx, [rdi + 56]
    mov     rdx, 0x9E3779B97F4A7C15
    imul    rax, rdx
    and     rax, r10
    mov     rdx, rax
    shr     rdx, cl
    xor     rax, rdx
    mov     rdx, 0xBF58476D1CE4E5B9
    imul    rax, rdx
    and     rax, r10
    mov     rdx, rax
    shr     rdx, cl
    xor     rax, rdx
    cmp     rax, r9
    jae     random_loop
    call    visit
    jmp     random_loop

    /* 0, K, 2K, ..., then 1, 1+K, ...: every page once. */
stride_loop:
    cmp     r13, r9
    jb      1f
    inc     r12
    cmp     r12, r10
    jae     finish
    cmp     r12, r9
    jae     finish
    mov     r13, r12
    jmp     stride_loop
1:
    mov     rax, r13
    add     r13, r10
    call    visit
    jmp     stride_loop

    /* arg accesses: the page of access i is the u32 at trace + 4 * i; pages repeat. */
trace_loop:
    cmp     r13, r10
    jae     finish
    mov     rsi, [rdi + 112]
    mov     eax, dword ptr [rsi + r13 * 4]
    inc     r13
    call    visit
    jmp     trace_loop

    /* Touch page rax. Keeps rdi, r8-r13; clobbers rax, rcx, rdx, rsi. */
visit:
    mov     rsi, rax
    shl     rsi, 12
    add     rsi, r8
    mov     rcx, [rdi + 24]
    cmp     rcx, 3
    je      verify
    cmp     rcx, 1
    je      write
    cmp     rcx, 2
    je      rmw
read:
    add     r15, [rsi]
    jmp     visited
write:
    mov     rdx, rax
    bts     rdx, 63
    mov     [rsi], rdx
    add     r15, rdx
    jmp     visited
rmw:
    mov     rdx, [rsi]
    add     r15, rdx
    inc     rdx
    mov     [rsi], rdx
    jmp     visited
verify:
    push    r12
    push    r13
    mov     r12, rax
    add     r12, [rdi + 104]        /* pattern index of the range's first page */
    shl     r12, 9
    inc     r12                     /* p * 512 + 1 */
    mov     r13, 0x9E3779B97F4A7C15
    add     r15, [rsi]
    xor     ecx, ecx
2:
    mov     rdx, r12
    add     rdx, rcx
    imul    rdx, r13
    xor     rdx, r11
    cmp     rdx, [rsi + rcx * 8]
    jne     bad
    inc     ecx
    cmp     ecx, 512
    jb      2b
    jmp     verified
bad:
    inc     rbp
    cmp     rbx, -1
    jne     verified
    mov     rbx, rax
verified:
    pop     r13
    pop     r12
visited:
    inc     r14
    mov     rdx, [rdi + 48]
    test    r14, rdx
    jnz     3f
    mov     eax, r14d
    mov     edx, 0xF0
    out     dx, eax
3:
    ret

finish:
    mov     [rdi + 64], r14
    mov     [rdi + 72], r15
    mov     [rdi + 80], rbx
    mov     [rdi + 88], rbp
    mov     qword ptr [rdi + 96], 0x600D
    mov     eax, r14d
    mov     edx, 0xF1
    out     dx, eax
    jmp     finish
