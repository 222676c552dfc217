/* Load generator for bench/ebpf_storm.py: exec and loopback-connect storms
 * at rates a Python loop cannot reach.
 *
 *   storm_load exec COUNT WORKERS            vfork+execve(/bin/true)+wait
 *   storm_load connect COUNT WORKERS ADDR    connect+accept+close on ADDR
 *   storm_load flows COUNT WORKERS ADDR [RATE]
 *                                           connect+send a first line+accept+close,
 *                                           paced to RATE flows/s in all (0: flat out)
 *
 * Prints "<operations> <seconds>" when done. Connects stay on the loopback
 * address given; clients close with RST so no TIME_WAIT piles up.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void exec_loop(long count)
{
	char *argv[] = {"/bin/true", "storm", NULL};

	for (long i = 0; i < count; i++) {
		pid_t pid = vfork();

		if (pid == 0) {
			execve(argv[0], argv, environ);
			_exit(127);
		}
		if (pid > 0)
			waitpid(pid, NULL, 0);
	}
}

static void connect_loop(long count, int listener, const struct sockaddr_in *to,
			 int payload, double interval)
{
	static const char line[] = "GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n";
	struct linger rst = {.l_onoff = 1, .l_linger = 0};
	double next = now();

	for (long i = 0; i < count; i++) {
		int c = socket(AF_INET, SOCK_STREAM, 0);
		int a;

		if (interval > 0) {
			double wait = next - now();

			if (wait > 0)
				usleep((useconds_t)(wait * 1e6));
			next += interval;
		}
		if (c < 0 || connect(c, (const struct sockaddr *)to, sizeof(*to)) < 0) {
			perror("connect");
			exit(1);
		}
		if (payload && send(c, line, sizeof(line) - 1, 0) < 0) {
			perror("send");
			exit(1);
		}
		a = accept(listener, NULL, NULL);
		setsockopt(c, SOL_SOCKET, SO_LINGER, &rst, sizeof(rst));
		close(c);
		if (a >= 0)
			close(a);
	}
}

int main(int argc, char **argv)
{
	long count, workers, per;
	int listener = -1, flows;
	double rate = 0;
	struct sockaddr_in to = {.sin_family = AF_INET};
	socklen_t len = sizeof(to);
	double start;

	flows = strcmp(argv[1], "flows") == 0;
	if (argc < 4 || ((strcmp(argv[1], "connect") == 0 || flows) && argc < 5)) {
		fprintf(stderr, "usage: %s exec|connect|flows COUNT WORKERS [ADDR [RATE]]\n",
			argv[0]);
		return 2;
	}
	if (flows && argc > 5)
		rate = atof(argv[5]);
	count = atol(argv[2]);
	workers = atol(argv[3]);
	per = count / workers;
	if (strcmp(argv[1], "connect") == 0 || flows) {
		listener = socket(AF_INET, SOCK_STREAM, 0);
		inet_pton(AF_INET, argv[4], &to.sin_addr);
		if (bind(listener, (struct sockaddr *)&to, sizeof(to)) < 0 ||
		    listen(listener, 4096) < 0 ||
		    getsockname(listener, (struct sockaddr *)&to, &len) < 0) {
			perror("listen");
			return 1;
		}
	}
	start = now();
	for (long w = 0; w < workers; w++) {
		if (fork() == 0) {
			if (listener >= 0)
				connect_loop(per, listener, &to, flows,
					     rate > 0 ? workers / rate : 0);
			else
				exec_loop(per);
			_exit(0);
		}
	}
	while (wait(NULL) > 0)
		;
	printf("%ld %.6f\n", per * workers, now() - start);
	return 0;
}
