/*
 * cloud_interop.c - an rpcgen + libtirpc client of docs/cloud.x, run by
 * tests/interop.rs against the real server.
 *
 * usage: cloud_interop PORT ARCHIVE EXPECTED
 * NULL, DEPLOY (ARCHIVE, 1 replica; over 64 KiB, so libtirpc sends several
 * fragments), STATUS, RETRIEVE (wait), CLOSE, then STATUS again. Every
 * answer is checked; the output must contain EXPECTED. Exit 0 iff all pass.
 */
#include "cloud.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

#define CHECK(cond, ...) do { \
	if (!(cond)) { printf("FAIL: " __VA_ARGS__); printf("\n"); failures++; } \
	else { printf("ok: " __VA_ARGS__); printf("\n"); } \
} while (0)

int
main(int argc, char **argv)
{
	struct sockaddr_in sin;
	int sock = RPC_ANYSOCK;
	CLIENT *clnt;
	FILE *f;
	long len;
	char *data;
	deploy_args dargs;
	deploy_res *dres;
	status_res *sres;
	retrieve_args rargs;
	retrieve_res *rres;
	close_res *cres;
	u_int ticket;
	struct timeval patient = { 120, 0 };

	if (argc != 4) {
		fprintf(stderr, "usage: cloud_interop PORT ARCHIVE EXPECTED\n");
		return 2;
	}
	f = fopen(argv[2], "rb");
	if (!f || fseek(f, 0, SEEK_END) != 0 || (len = ftell(f)) < 0) {
		perror(argv[2]);
		return 2;
	}
	rewind(f);
	data = malloc(len);
	if (!data || fread(data, 1, len, f) != (size_t)len) {
		perror("read archive");
		return 2;
	}
	fclose(f);

	memset(&sin, 0, sizeof sin);
	sin.sin_family = AF_INET;
	sin.sin_port = htons((unsigned short)atoi(argv[1]));
	sin.sin_addr.s_addr = inet_addr("127.0.0.1");
	clnt = clnttcp_create(&sin, CLOUD_PROG, CLOUD_VERS, &sock, 0, 0);
	if (!clnt) {
		clnt_pcreateerror("clnttcp_create");
		return 1;
	}
	/* RETRIEVE with wait may take as long as the job runs. */
	clnt_control(clnt, CLSET_TIMEOUT, (char *)&patient);

	CHECK(cloud_null_1(NULL, clnt) != NULL, "NULL answered");

	dargs.replicas = 1;
	dargs.archive.archive_len = (u_int)len;
	dargs.archive.archive_val = data;
	dres = deploy_1(&dargs, clnt);
	CHECK(dres && dres->stat == CLOUD_OK, "DEPLOY of %ld bytes accepted", len);
	if (!dres || dres->stat != CLOUD_OK)
		return 1;
	ticket = dres->deploy_res_u.ticket;
	printf("ticket=%u\n", ticket);

	sres = status_1(&ticket, clnt);
	CHECK(sres && sres->stat == CLOUD_OK, "STATUS ok");
	if (sres && sres->stat == CLOUD_OK) {
		job_status *j = &sres->status_res_u.job;
		CHECK(j->ticket == ticket, "STATUS ticket echoed");
		CHECK(j->replicas.replicas_len == 1, "STATUS lists 1 replica");
		CHECK(j->state == WAITING || j->state == RUNNING || j->state == COMPLETED,
		    "STATUS state %d plausible", j->state);
	}

	rargs.ticket = ticket;
	rargs.wait = TRUE;
	rres = retrieve_1(&rargs, clnt);
	CHECK(rres && rres->stat == CLOUD_OK, "RETRIEVE ok");
	if (rres && rres->stat == CLOUD_OK) {
		replica_output *o = &rres->retrieve_res_u.outputs.outputs_val[0];
		CHECK(rres->retrieve_res_u.outputs.outputs_len == 1, "RETRIEVE has 1 output");
		CHECK(o->state == COMPLETED, "replica COMPLETED (%s)", o->message);
		CHECK(o->exit_code == 0, "replica exit code 0");
		CHECK(o->output.output_len > 0 &&
		    memmem(o->output.output_val, o->output.output_len, argv[3], strlen(argv[3])) != NULL,
		    "output contains \"%s\"", argv[3]);
		CHECK(strncmp(o->node, "127.0.0.1:", 10) == 0, "node is %s", o->node);
	}

	cres = close_1(&ticket, clnt);
	CHECK(cres && cres->stat == CLOUD_OK, "CLOSE ok");
	sres = status_1(&ticket, clnt);
	CHECK(sres && sres->stat == CLOUD_NO_SUCH_TICKET, "STATUS after CLOSE: no such ticket (%s)",
	    sres && sres->stat != CLOUD_OK ? sres->status_res_u.message : "?");
	cres = close_1(&ticket, clnt);
	CHECK(cres && cres->stat == CLOUD_NO_SUCH_TICKET, "second CLOSE: no such ticket");

	clnt_destroy(clnt);
	printf("%d failure(s)\n", failures);
	return failures ? 1 : 0;
}
