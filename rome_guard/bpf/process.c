/* Process lifecycle: exec with argv, fork, exit. Part of sensor.c.
 *
 * exec: sys_enter_execve(at) copies argv into exec_pending[tid] while the
 * caller's memory is still there; sched_process_exec (success only) adds
 * the resolved filename and emits one record; sys_exit_execve(at) drops the
 * entry of a failed exec, so failed PATH lookups cost no ring space. An
 * argument the kernel had not paged in yet cannot be read at entry; where
 * sched_prepare_exec exists (6.10+) it is read again there, else the record
 * says EXEC_ARGV_FAULT and user space falls back to /proc.
 *
 * fork: task:task_newtask, not sched_process_fork, because it carries the
 * clone flags: CLONE_THREAD children are threads and are not reported. The
 * parent recorded is the creating process (also under CLONE_PARENT, where
 * getppid() would name the grandparent: lineage follows who created it).
 *
 * exit: sched_process_exit fires per thread; a process has exited when its
 * last thread does (group_dead where the tracepoint has it, else when the
 * thread-group leader exits).
 *
 * fd: socket(AF_INET/AF_INET6) results, and connections accepted on them,
 * are remembered per (process, fd);
 * a dup/dup2/dup3/fcntl(F_DUPFD*) of one of them whose result is 0, 1 or 2
 * is reported (checked at syscall exit: the result is what happened, as in
 * falco PR #2076). Shell pipelines dup2 pipes onto 0-2 all day: they cost
 * one map lookup and no record. An fd record always wakes user space: the
 * process is judged again at once.
 *
 * rename: task:task_rename for the thread-group leader, outside exec (exec
 * renames every process to its file name; exec_pending tells them apart).
 * Like an exec, it wakes user space when the new name is one the rules
 * index (wake_names); else it is read at the next drain (10 ms at most).
 */

static __always_inline int capture_exec_args(const char *const *argv)
{
	__u64 argv_ptr = (__u64)argv;
	__u32 zero = 0;
	__u32 tid = current_tid();
	struct exec_record *rec = exec_scratch.lookup(&zero);
	const char *arg = NULL;
	/* 64-bit on purpose: 32-bit values get zero-extended copies whose
	 * bounds the verifier does not connect to the checks below */
	__u64 off = 0;
	__u64 i;

	if (!rec)
		return 0;
	rec->argc = 0;
	rec->args_count = 0;
	rec->args_size = 0;
	rec->filename_size = 0;
	rec->flags = 0;
	rec->args_cut = 0;

	for (i = 0; i < ARGV_MAX_ARGS; i++) {
		__u64 size;
		long n;

		if (bpf_probe_read_user(&arg, sizeof(arg),
					(const void *)((unsigned long)argv + i * sizeof(arg))) < 0) {
			rec->flags |= EXEC_ARGV_FAULT | EXEC_ARGV_TRUNCATED;
			goto store;
		}
		if (!arg) {
			rec->argc = i;
			goto store;
		}
		if (off >= ARGV_LIMIT)
			break; /* no room left: count the rest below */
		size = ARGV_LIMIT - off;
		if (size > ARG_MAX_LEN)
			size = ARG_MAX_LEN;
		n = bpf_probe_read_user_str(&rec->data[off], size, arg);
		if (n <= 0) {
			/* not paged in: keep the position, mark the argument cut */
			rec->data[off] = 0;
			n = 1;
			rec->args_cut |= 1ULL << i;
			rec->flags |= EXEC_ARGV_FAULT | EXEC_ARGV_TRUNCATED;
		} else if (n == size) {
			/* size-1 bytes fitted; cut unless the next byte ends it */
			char last = 1;

			bpf_probe_read_user(&last, 1, arg + size - 1);
			if (last) {
				rec->args_cut |= 1ULL << i;
				rec->flags |= EXEC_ARGV_TRUNCATED;
			}
		}
		off += n;
		rec->args_size = off;
		rec->args_count = i + 1;
	}

	/* stopped copying before the end: count what is left. The loop never
	 * compares i, so the verifier checks it once, not once per value of i. */
	{
		__u64 j;

		for (j = 0; j < ARGC_COUNT_MAX - ARGV_MAX_ARGS; j++) {
			if (bpf_probe_read_user(&arg, sizeof(arg),
						(const void *)((unsigned long)argv +
							       (i + j) * sizeof(arg))) < 0) {
				rec->flags |= EXEC_ARGV_FAULT;
				break;
			}
			if (!arg)
				break;
		}
		if (j == ARGC_COUNT_MAX - ARGV_MAX_ARGS)
			rec->flags |= EXEC_ARGC_CAPPED;
		rec->argc = i + j;
	}
	if (rec->argc > rec->args_count)
		rec->flags |= EXEC_ARGV_TRUNCATED;

store:
	/* A full table means the exec record will say EXEC_ARGV_MISSING. */
	exec_pending.update(&tid, rec);
#ifdef HAVE_PREPARE_EXEC
	/* Pages the kernel has not faulted in yet (string literals of a
	 * freshly forked child) are resident by sched_prepare_exec: retry. */
	if (rec->flags & EXEC_ARGV_FAULT)
		exec_retry.update(&tid, &argv_ptr);
#endif
	return 0;
}

int rgs_execve(struct tracepoint__syscalls__sys_enter_execve *args)
{
	return capture_exec_args(args->argv);
}

static __always_inline int drop_exec_state(void)
{
	__u32 tid = current_tid();

	exec_pending.delete(&tid);
	exec_retry.delete(&tid);
	return 0;
}

int rgs_execve_ret(struct tracepoint__syscalls__sys_exit_execve *args)
{
	return drop_exec_state();
}

#ifdef HAVE_EXECVEAT
int rgs_execveat(struct tracepoint__syscalls__sys_enter_execveat *args)
{
	return capture_exec_args(args->argv);
}

int rgs_execveat_rt(struct tracepoint__syscalls__sys_exit_execveat *args)
{
	return drop_exec_state();
}
#endif

#ifdef HAVE_PREPARE_EXEC
/* Still the old program (same tid, old memory), past the kernel's copy of
 * argv: a capture that faulted at syscall entry is redone here. */
int rgs_prep_exec(struct tracepoint__sched__sched_prepare_exec *args)
{
	__u32 tid = current_tid();
	__u64 *argv = exec_retry.lookup(&tid);

	if (!argv)
		return 0;
	exec_retry.delete(&tid);
	return capture_exec_args((const char *const *)*argv);
}
#endif

int rgs_exec(struct tracepoint__sched__sched_process_exec *args)
{
	__u32 zero = 0;
	__u32 old_pid = args->old_pid;
	struct exec_record *rec = exec_pending.lookup(&old_pid);
	int pending = rec != NULL;
	struct proc_state *ps;
	struct proc_state fresh = {};
	unsigned short loc_off = args->data_loc_filename & 0xFFFF;
	unsigned short loc_len = args->data_loc_filename >> 16;
	__u64 off, size;
	long n;

	if (!rec) {
		/* exec not seen at entry: started before us, a kernel-made
		 * exec (usermode helper), or exec_pending was full */
		rec = exec_scratch.lookup(&zero);
		if (!rec)
			return 0;
		rec->argc = 0;
		rec->args_count = 0;
		rec->args_size = 0;
		rec->args_cut = 0;
		rec->flags = EXEC_ARGV_MISSING;
	}
	fill_header(&rec->hdr, RECORD_EXEC);
	rec->old_pid = old_pid;

	ps = procs.lookup(&rec->hdr.pid);
	if (ps) {
		rec->ppid = ps->ppid;
		ps->generation_ns = rec->hdr.timestamp_ns;
	} else {
		rec->ppid = 0;
		fresh.generation_ns = rec->hdr.timestamp_ns;
		procs.update(&rec->hdr.pid, &fresh);
	}

	off = rec->args_size;
	if (off > ARGV_LIMIT)
		off = ARGV_LIMIT;
	n = bpf_probe_read_kernel_str(&rec->data[off], FILENAME_MAX_LEN, (char *)args + loc_off);
	if (n < 0 || n > FILENAME_MAX_LEN)
		n = 0;
	if (loc_len > FILENAME_MAX_LEN)
		rec->flags |= EXEC_FILENAME_TRUNCATED;
	rec->filename_size = n;

	size = offsetof(struct exec_record, data) + off + (__u64)n;
	if (size > sizeof(*rec))
		size = sizeof(*rec);
	if (process_events.ringbuf_output(rec, size, exec_flags(rec->hdr.comm)) < 0)
		count_lost(LOST_PROCESS);
	if (pending)
		exec_pending.delete(&old_pid);
	exec_retry.delete(&old_pid);
	return 0;
}

int rgs_newtask(struct tracepoint__task__task_newtask *args)
{
	struct fork_record *r;
	struct proc_state child = {};
	__u32 child_pid = args->pid;

	if (args->clone_flags & RG_CLONE_THREAD)
		return 0;
	r = process_events.ringbuf_reserve(sizeof(*r));
	if (!r) {
		count_lost(LOST_PROCESS);
		return 0;
	}
	fill_header(&r->hdr, RECORD_FORK);
	r->child_pid = child_pid;
	r->_pad = 0;
	r->clone_flags = args->clone_flags;
	child.ppid = r->hdr.pid;
	child.generation_ns = r->hdr.timestamp_ns;
	procs.update(&child_pid, &child);
	process_events.ringbuf_submit(r, lifecycle_flags());
	return 0;
}

int rgs_socket(struct tracepoint__syscalls__sys_enter_socket *args)
{
	__u32 tid = current_tid();
	__u8 one = 1;

	if (args->family == RG_AF_INET || args->family == RG_AF_INET6)
		socket_pending.update(&tid, &one);
	return 0;
}

static __always_inline int remember_new_socket(long ret)
{
	__u32 tid = current_tid();
	struct fd_key key = {};
	__u8 one = 1;

	if (!socket_pending.lookup(&tid))
		return 0;
	socket_pending.delete(&tid);
	if (ret < 0)
		return 0;
	key.tgid = bpf_get_current_pid_tgid() >> 32;
	key.fd = ret;
	inet_fds.update(&key, &one);
	return 0;
}

int rgs_socket_ret(struct tracepoint__syscalls__sys_exit_socket *args)
{
	return remember_new_socket(args->ret);
}

/* a connection accepted on a remembered inet listener is an inet socket
 * too: the bind shell dup2s it onto 0-2 */
static __always_inline int accept_enter(__u64 fd)
{
	struct fd_key key = {};
	__u32 tid = current_tid();
	__u8 one = 1;

	key.tgid = bpf_get_current_pid_tgid() >> 32;
	key.fd = (__s32)fd;
	if (inet_fds.lookup(&key))
		socket_pending.update(&tid, &one);
	return 0;
}

#ifdef HAVE_ACCEPT
int rgs_accept(struct tracepoint__syscalls__sys_enter_accept *args)
{
	return accept_enter(args->fd);
}

int rgs_accept_ret(struct tracepoint__syscalls__sys_exit_accept *args)
{
	return remember_new_socket(args->ret);
}
#endif

int rgs_accept4(struct tracepoint__syscalls__sys_enter_accept4 *args)
{
	return accept_enter(args->fd);
}

int rgs_accept4_ret(struct tracepoint__syscalls__sys_exit_accept4 *args)
{
	return remember_new_socket(args->ret);
}

static __always_inline int dup_enter(__u64 oldfd, __u64 newfd, __u32 via)
{
	struct fd_key key = {};
	struct dup_pending pending = {};
	__u32 tid = current_tid();

	if (newfd > 2)
		return 0; /* dup2/dup3 onto another descriptor: not stdio */
	key.tgid = bpf_get_current_pid_tgid() >> 32;
	key.fd = (__s32)oldfd;
	if (!inet_fds.lookup(&key))
		return 0;
	pending.oldfd = (__s32)oldfd;
	pending.via = via;
	dup_pending.update(&tid, &pending);
	return 0;
}

static __always_inline int dup_exit(long ret)
{
	__u32 tid = current_tid();
	struct dup_pending *pending = dup_pending.lookup(&tid);
	struct fd_record *r;
	struct fd_key key = {};
	__u8 one = 1;

	if (!pending)
		return 0;
	if (ret < 0 || ret > 2) {
		dup_pending.delete(&tid);
		return 0;
	}
	key.tgid = bpf_get_current_pid_tgid() >> 32;
	key.fd = (__s32)ret;
	inet_fds.update(&key, &one);
	r = process_events.ringbuf_reserve(sizeof(*r));
	if (!r) {
		count_lost(LOST_PROCESS);
		dup_pending.delete(&tid);
		return 0;
	}
	fill_header(&r->hdr, RECORD_FD_DUP);
	r->oldfd = pending->oldfd;
	r->newfd = (__s32)ret;
	r->via = pending->via;
	r->_pad = 0;
	process_events.ringbuf_submit(r, judge_now_flags());
	dup_pending.delete(&tid);
	return 0;
}

int rgs_dup(struct tracepoint__syscalls__sys_enter_dup *args)
{
	return dup_enter(args->fildes, 0, FD_VIA_DUP); /* lowest free fd: known at exit */
}

int rgs_dup_ret(struct tracepoint__syscalls__sys_exit_dup *args)
{
	return dup_exit(args->ret);
}

#ifdef HAVE_DUP2
int rgs_dup2(struct tracepoint__syscalls__sys_enter_dup2 *args)
{
	return dup_enter(args->oldfd, args->newfd, FD_VIA_DUP2);
}

int rgs_dup2_ret(struct tracepoint__syscalls__sys_exit_dup2 *args)
{
	return dup_exit(args->ret);
}
#endif

int rgs_dup3(struct tracepoint__syscalls__sys_enter_dup3 *args)
{
	return dup_enter(args->oldfd, args->newfd, FD_VIA_DUP3);
}

int rgs_dup3_ret(struct tracepoint__syscalls__sys_exit_dup3 *args)
{
	return dup_exit(args->ret);
}

int rgs_fcntl(struct tracepoint__syscalls__sys_enter_fcntl *args)
{
	/* F_DUPFD 0, F_DUPFD_CLOEXEC 1030: the lowest free fd >= arg */
	if (args->cmd != 0 && args->cmd != 1030)
		return 0;
	return dup_enter(args->fd, args->arg, FD_VIA_FCNTL);
}

int rgs_fcntl_ret(struct tracepoint__syscalls__sys_exit_fcntl *args)
{
	return dup_exit(args->ret);
}

int rgs_rename(struct tracepoint__task__task_rename *args)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	struct rename_record *r;

	if (args->pid != (pid_t)(pid_tgid >> 32) || tid != (pid_tgid >> 32))
		return 0; /* a thread's name, or another task's */
	if (exec_pending.lookup(&tid))
		return 0; /* exec naming the process after its file */
	r = process_events.ringbuf_reserve(sizeof(*r));
	if (!r) {
		count_lost(LOST_PROCESS);
		return 0;
	}
	fill_header(&r->hdr, RECORD_RENAME);
	__builtin_memset(r->newcomm, 0, sizeof(r->newcomm)); /* wake_names keys are zero-padded */
	bpf_probe_read_kernel_str(r->newcomm, sizeof(r->newcomm), args->newcomm);
	/* renamed to a name the rules know: wake user space now; any other
	 * rename (an argv rewrite) is judged at the next drain, within 10 ms */
	process_events.ringbuf_submit(r, exec_flags(r->newcomm));
	return 0;
}

int rgs_exit_group(struct tracepoint__syscalls__sys_enter_exit_group *args)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__s32 code = args->error_code & 0xff;

	exit_codes.update(&tgid, &code);
	return 0;
}

int rgs_exit(struct tracepoint__sched__sched_process_exit *args)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	__u32 tgid = pid_tgid >> 32;
	struct exit_record *r;
	__s32 *code;

	/* per-thread state of the other families */
	exec_pending.delete(&tid);
	exec_retry.delete(&tid);
	connect_pending.delete(&tid);
	send_pending.delete(&tid);
	gpu_pending.delete(&tid);
	socket_pending.delete(&tid);
	dup_pending.delete(&tid);

#ifdef HAVE_GROUP_DEAD
	if (!args->group_dead)
		return 0;
#else
	if (tid != tgid)
		return 0;
#endif
	procs.delete(&tgid);
	r = process_events.ringbuf_reserve(sizeof(*r));
	if (!r) {
		count_lost(LOST_PROCESS);
		exit_codes.delete(&tgid);
		return 0;
	}
	fill_header(&r->hdr, RECORD_EXIT);
	code = exit_codes.lookup(&tgid);
	r->exit_code = code ? *code : -1;
	r->_pad = 0;
	process_events.ringbuf_submit(r, lifecycle_flags());
	exit_codes.delete(&tgid);
	return 0;
}
