"""Operations helpers every stage may use: the fleet's PKI, broker processes and progress reporting."""
