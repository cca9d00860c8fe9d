/*
 * edgefleet_guard: a mosquitto 2.0 plugin that closes the gaps the acl_file cannot.
 *
 * 1. mosquitto 2.0's acl_file never checks subscriptions (security_default.c answers every SUBSCRIBE
 *    with success; reads are checked only at delivery). Any client that subscribes to the ingest's
 *    shared subscription ($share/ingest/...) joins the group and is dealt its round-robin share: a
 *    service that may read the topics keeps that share from ingest, one that may not (a device, Home
 *    Assistant) loses each message at the read check, after the publisher got its PUBACK. This plugin
 *    refuses every $share/GROUP/... subscription (SUBACK failure) unless GROUP:IDENTITY is listed in
 *    plugin_opt_share_groups.
 * 2. Client ids are tied to certificates. mosquitto 2.0 only calls a plugin at CONNECT (basic auth) on
 *    a listener without use_identity_as_username, so the services' listener leaves that setting out and
 *    this plugin does its work: the identity is the certificate's common name (a username sent by the
 *    client is ignored), a service's client id must be NAME or NAME-..., a device's exactly NAME;
 *    anything else is refused before mosquitto looks the client id up, so no certificate can take over
 *    (disconnect) another identity's session. The device listener keeps use_identity_as_username and
 *    use_username_as_clientid (a device's client id is its name there); should a device identity reach
 *    a listener with neither, every publish, subscribe and delivery is refused to it unless its client
 *    id is its name.
 *
 * Everything else is deferred to the acl_file. Configure (see deploy/mosquitto/edgefleet.conf):
 *     plugin /usr/lib/mosquitto/edgefleet_guard.so
 *     plugin_opt_services trainer monitor homeassistant
 *     plugin_opt_share_groups ingest:trainer
 * Build: make broker-plugin (needs gcc, Debian's mosquitto-dev and libssl-dev).
 */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/x509.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define MAX_SERVICES 32
#define MAX_SHARE_GROUPS 32
#define MAX_NAME 256

struct share_group {
	const char *group;
	const char *identity;
};

static mosquitto_plugin_id_t *plugin_id = NULL;
static char *services_text = NULL;
static const char *services[MAX_SERVICES];
static int service_count = 0;
static char *share_groups_text = NULL;
static struct share_group share_groups[MAX_SHARE_GROUPS];
static int share_group_count = 0;

/* Whether username is one of plugin_opt_services. */
static bool is_service(const char *username)
{
	for(int i = 0; i < service_count; i++){
		if(!strcmp(services[i], username)) return true;
	}
	return false;
}

/* Whether a client of certificate name `name` may use client id `id`: a service NAME or NAME-SUFFIX
 * (one identity runs several connections), a device exactly NAME. */
static bool client_id_allowed(const char *name, const char *id)
{
	size_t len = strlen(name);

	if(!strcmp(id, name)) return true;
	if(!is_service(name)) return false;
	return !strncmp(id, name, len) && id[len] == '-' && id[len + 1] != '\0';
}

/* Whether `topic` ($share/GROUP/filter) names a group `username` may join (plugin_opt_share_groups). */
static bool share_allowed(const char *username, const char *topic)
{
	const char *group = topic + strlen("$share/");
	const char *end = strchr(group, '/');

	if(!end) return false;
	for(int i = 0; i < share_group_count; i++){
		const char *g = share_groups[i].group;
		if(strlen(g) == (size_t)(end - group) && !strncmp(g, group, (size_t)(end - group))
				&& !strcmp(share_groups[i].identity, username)){
			return true;
		}
	}
	return false;
}

/* The common name of the client's certificate into `out` (false without one, or with a NUL in it). */
static bool certificate_name(const struct mosquitto *client, char *out, size_t out_len)
{
	X509 *cert = mosquitto_client_certificate(client);
	bool ok = false;

	if(!cert) return false;
	X509_NAME *subject = X509_get_subject_name(cert);
	int i = subject ? X509_NAME_get_index_by_NID(subject, NID_commonName, -1) : -1;
	if(i >= 0){
		ASN1_STRING *cn = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, i));
		int len = cn ? ASN1_STRING_length(cn) : -1;
		const unsigned char *data = cn ? ASN1_STRING_get0_data(cn) : NULL;
		if(data && len > 0 && (size_t)len < out_len && memchr(data, '\0', (size_t)len) == NULL){
			memcpy(out, data, (size_t)len);
			out[len] = '\0';
			ok = true;
		}
	}
	X509_free(cert);
	return ok;
}

/* CONNECT on a listener without use_identity_as_username: the identity from the certificate, the
 * client id bound to it. */
static int basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	const char *id = mosquitto_client_id(ed->client);
	char name[MAX_NAME];
	(void)event;
	(void)userdata;

	if(!certificate_name(ed->client, name, sizeof(name))){
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				"edgefleet_guard: refused %s: no client certificate with a common name", id ? id : "?");
		return MOSQ_ERR_AUTH;
	}
	if(!id || !client_id_allowed(name, id)){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "edgefleet_guard: refused %s: client id '%s' is not '%s'%s%s%s",
				name, id ? id : "", name, is_service(name) ? " nor '" : "", is_service(name) ? name : "",
				is_service(name) ? "-...'" : "");
		return MOSQ_ERR_AUTH;
	}
	if(mosquitto_set_username(ed->client, name) != MOSQ_ERR_SUCCESS) return MOSQ_ERR_AUTH;
	return MOSQ_ERR_SUCCESS;
}

static int acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *username = mosquitto_client_username(ed->client);
	const char *id = mosquitto_client_id(ed->client);
	(void)event;
	(void)userdata;

	if(!username || !id) return MOSQ_ERR_ACL_DENIED;
	if(!is_service(username) && strcmp(id, username)){
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				"edgefleet_guard: denied %s: client id '%s' is not its certificate name", username, id);
		return MOSQ_ERR_ACL_DENIED;
	}
	if((ed->access == MOSQ_ACL_SUBSCRIBE || ed->access == MOSQ_ACL_UNSUBSCRIBE)
			&& !strncmp(ed->topic, "$share/", strlen("$share/")) && !share_allowed(username, ed->topic)){
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				"edgefleet_guard: denied %s (client %s) the shared subscription %s", username, id, ed->topic);
		return MOSQ_ERR_ACL_DENIED;
	}
	return MOSQ_ERR_PLUGIN_DEFER;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

/* plugin_opt_services: service identities, separated by spaces or commas. */
static int parse_services(void)
{
	for(char *tok = strtok(services_text, " ,"); tok; tok = strtok(NULL, " ,")){
		if(service_count == MAX_SERVICES){
			mosquitto_log_printf(MOSQ_LOG_ERR, "edgefleet_guard: plugin_opt_services: more than %d", MAX_SERVICES);
			return MOSQ_ERR_INVAL;
		}
		services[service_count++] = tok;
	}
	if(service_count == 0){
		mosquitto_log_printf(MOSQ_LOG_ERR, "edgefleet_guard: plugin_opt_services (service identities) is required");
		return MOSQ_ERR_INVAL;
	}
	return MOSQ_ERR_SUCCESS;
}

/* plugin_opt_share_groups: GROUP:IDENTITY pairs, separated by spaces or commas; IDENTITY a service. */
static int parse_share_groups(void)
{
	for(char *tok = strtok(share_groups_text, " ,"); tok; tok = strtok(NULL, " ,")){
		char *colon = strchr(tok, ':');
		if(!colon || colon == tok || colon[1] == '\0' || strchr(tok, '/') || !is_service(colon + 1)
				|| share_group_count == MAX_SHARE_GROUPS){
			mosquitto_log_printf(MOSQ_LOG_ERR, "edgefleet_guard: plugin_opt_share_groups: '%s' is not "
					"GROUP:IDENTITY with IDENTITY in plugin_opt_services (at most %d pairs)", tok, MAX_SHARE_GROUPS);
			return MOSQ_ERR_INVAL;
		}
		*colon = '\0';
		share_groups[share_group_count++] = (struct share_group){tok, colon + 1};
	}
	if(share_group_count == 0){
		mosquitto_log_printf(MOSQ_LOG_ERR, "edgefleet_guard: plugin_opt_share_groups (GROUP:IDENTITY, "
				"e.g. ingest:trainer) is required");
		return MOSQ_ERR_INVAL;
	}
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **user_data,
		struct mosquitto_opt *opts, int opt_count)
{
	int rc;
	(void)user_data;
	plugin_id = identifier;
	for(int i = 0; i < opt_count; i++){
		if(!strcmp(opts[i].key, "services") && !services_text){
			services_text = strdup(opts[i].value);
		}else if(!strcmp(opts[i].key, "share_groups") && !share_groups_text){
			share_groups_text = strdup(opts[i].value);
		}
	}
	if(!services_text) services_text = strdup("");
	if(!share_groups_text) share_groups_text = strdup("");
	if(!services_text || !share_groups_text) return MOSQ_ERR_NOMEM;
	rc = parse_services();
	if(rc == MOSQ_ERR_SUCCESS) rc = parse_share_groups();
	if(rc == MOSQ_ERR_SUCCESS) rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, acl_check, NULL, NULL);
	if(rc == MOSQ_ERR_SUCCESS) rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, basic_auth, NULL, NULL);
	return rc;
}

int mosquitto_plugin_cleanup(void *user_data, struct mosquitto_opt *opts, int opt_count)
{
	(void)user_data;
	(void)opts;
	(void)opt_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, acl_check, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, basic_auth, NULL);
	free(services_text);
	free(share_groups_text);
	services_text = NULL;
	share_groups_text = NULL;
	service_count = 0;
	share_group_count = 0;
	return MOSQ_ERR_SUCCESS;
}
